"""The latent cache's reader: the clip windows that ``prefalign preprocess`` (``prefalign.preprocess``) encoded once
into safetensors shards, served by ``CachedClipDataset`` as batch items, so that training at scale never decodes video."""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from prefalign.data.errors import DataError

FORMAT = "prefalign-latent-cache"
VERSION = 1
MANIFEST = "manifest.json"
DTYPES = ("float32", "float16", "bfloat16")
#: Tensor fields an entry may hold in its shard, under ``"<entry key>/<field>"``.
TENSOR_FIELDS = ("latents", "rejected_latents", "audio", "audio_features", "reference", "pose")
#: Fields stored in the cache's dtype; audio and pose stay float32, the reference uint8 (it is exact that way).
ENCODED_FIELDS = ("latents", "rejected_latents", "audio_features")
#: Fields every entry has.
REQUIRED_FIELDS = ("latents", "audio", "reference")


# --- what a cache was made with ----------------------------------------------------------------------------------------
def _class_path(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def jsonable(value):
    """``value`` as it reads back from JSON (anything JSON cannot hold as its ``str``)."""
    return json.loads(json.dumps(value, default=str))


def _describe(module: torch.nn.Module) -> dict:
    """What decides a frozen module's outputs: its scalar settings, the config of the model it wraps (a diffusers
    VAE's or a transformers model's, including where its weights came from) and the weights' dtype."""
    config = {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_") and name != "training" and isinstance(value, (bool, int, float, str, list, tuple))
    }
    for name, child in module.named_children():
        inner = getattr(child, "config", None)
        if inner is None:
            continue
        inner = inner.to_dict() if hasattr(inner, "to_dict") else dict(inner)
        config[name] = {
            key: value
            for key, value in inner.items()
            if key == "_name_or_path" or not (key.startswith("_") or key.endswith("_version"))
        }
    weight = next(module.parameters(), None)
    if weight is not None:
        config["weights_dtype"] = str(weight.dtype).removeprefix("torch.")
    return jsonable(config)


def fingerprint(denoiser, fps: float, sample_rate: int, num_frames: int, frame_size: tuple[int, int], dtype: str) -> dict:
    """What cached tensors depend on: the codec and audio encoder (classes, settings, output shapes), the data
    module's rates and window length, and the dtype they are stored in."""
    encoder = denoiser.audio_encoder
    return {
        "codec": {
            "class": _class_path(denoiser.codec),
            "config": _describe(denoiser.codec),
            "frame_size": list(frame_size),
            "latent_shape": list(denoiser.latent_shape(num_frames, *frame_size)),
        },
        "audio_encoder": None
        if encoder is None
        else {
            "class": _class_path(encoder),
            "config": _describe(encoder),
            "sample_rate": encoder.sample_rate,
            "feature_shape": [num_frames, encoder.num_levels, encoder.feature_dim],
        },
        "fps": float(fps),
        "sample_rate": int(sample_rate),
        "num_frames": int(num_frames),
        "dtype": dtype,
    }


def _differences(cached: dict, run: dict) -> str:
    keys = sorted(set(cached) | set(run), key=str)
    return ", ".join(f"{k}: {cached.get(k)!r} in the cache, {run.get(k)!r} in this run" for k in keys if cached.get(k) != run.get(k))


# --- reading ------------------------------------------------------------------------------------------------------------
class LatentCache:
    """A cache written by :func:`prefalign.preprocess.preprocess`: its manifest, checked on opening, and its shards,
    opened lazily.

    Every shard is opened once here, so a missing or truncated shard or a missing tensor is an error naming the
    file now rather than in the middle of an epoch.

    Args:
        folder (str | Path): the cache folder (holding ``manifest.json`` and ``shard-*.safetensors``).
    """

    #: Open shards kept per process (each worker process keeps its own).
    max_open_shards = 16

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self.manifest = self._read_manifest()
        self.fingerprint: dict = self.manifest["fingerprint"]
        self.entries: list[dict] = self.manifest["entries"]
        self.fields: set[str] = set(self.manifest["fields"])
        self.num_frames: int = int(self.fingerprint["num_frames"])
        self._handles: OrderedDict = OrderedDict()
        self._pid = os.getpid()
        self._validate_shards()

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"LatentCache({str(self.folder)!r}, {len(self)} windows)"

    def _read_manifest(self) -> dict:
        try:
            manifest = json.loads(self.path.read_text())
        except FileNotFoundError:
            raise DataError("no latent cache here (write one with `prefalign preprocess`)", path=self.path) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise DataError(f"corrupt cache manifest ({error})", path=self.path) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataError(f"not a latent cache manifest (expected format '{FORMAT}')", path=self.path, field="format")
        if manifest.get("version") != VERSION:
            raise DataError(
                f"cache version {manifest.get('version')!r}, this prefalign reads version {VERSION}: preprocess again",
                path=self.path,
                field="version",
            )
        for key, kind in {"fingerprint": dict, "fields": list, "shards": list, "entries": list}.items():
            if not isinstance(manifest.get(key), kind):
                raise DataError(f"missing or not a {kind.__name__}", path=self.path, field=key)
        for key in ("num_frames", "fps", "sample_rate", "codec", "audio_encoder"):
            if key not in manifest["fingerprint"]:
                raise DataError("missing", path=self.path, field=f"fingerprint.{key}")
        shards = set(manifest["shards"])
        for index, entry in enumerate(manifest["entries"]):
            for key in ("id", "shard", "key", "row", "start_frame"):
                if not isinstance(entry, dict) or key not in entry:
                    raise DataError("missing", path=self.path, field=f"entries[{index}].{key}")
            if entry["shard"] not in shards:
                raise DataError(f"names shard {entry['shard']!r}, not in 'shards'", path=self.path, field=f"entries[{index}].shard")
        return manifest

    def _validate_shards(self) -> None:
        keys: dict[str, set[str]] = {}
        for name in self.manifest["shards"]:
            path = self.folder / name
            if not path.is_file():
                raise DataError("shard missing", path=path, field="shards")
            try:
                with safe_open(str(path), framework="pt") as handle:
                    keys[name] = set(handle.keys())
            except Exception as error:  # safetensors raises its own error type for bad headers and short files
                raise DataError(f"cannot read shard ({error})", path=path, field="shards") from None
        for entry in self.entries:
            for field in REQUIRED_FIELDS:
                if f"{entry['key']}/{field}" not in keys[entry["shard"]]:
                    raise DataError(
                        f"tensor '{entry['key']}/{field}' of clip {entry['id']} (frame {entry['start_frame']}) missing",
                        path=self.folder / entry["shard"],
                        field=field,
                    )

    def __getstate__(self) -> dict:
        # Shard handles are per process: a worker opens its own.
        return {**self.__dict__, "_handles": OrderedDict()}

    def _open(self, name: str):
        if self._pid != os.getpid():
            self._handles, self._pid = OrderedDict(), os.getpid()
        if name in self._handles:
            self._handles.move_to_end(name)
            return self._handles[name]
        path = self.folder / name
        try:
            handle = safe_open(str(path), framework="pt")
            opened = (handle, set(handle.keys()))
        except Exception as error:
            raise DataError(f"cannot read shard ({error})", path=path, field="shards") from None
        self._handles[name] = opened
        if len(self._handles) > self.max_open_shards:
            self._handles.popitem(last=False)
        return opened

    def read(self, index: int) -> dict:
        """Entry ``index`` as a batch item: ``id``, ``latents``, ``audio``, ``reference`` float [3,H,W] in [0, 1],
        ``num_frames``, and where cached ``rejected_latents``, ``audio_features``, ``pose``, ``labels``.

        A tensor of another dtype than the cache writes (uint8 references, floating-point others), of another
        shape than the fingerprint's, or holding NaN or infinity is a ``DataError`` naming the shard and the
        window (clip id and first frame): a skip under ``on_bad_sample: skip``, not a non-finite loss."""
        entry = self.entries[index]
        handle, keys = self._open(entry["shard"])
        path = self.folder / entry["shard"]
        item: dict = {"id": entry["id"]}
        window = f"window '{entry['key']}' (clip {entry['id']}, frame {entry['start_frame']})"
        for field in TENSOR_FIELDS:
            key = f"{entry['key']}/{field}"
            if key not in keys:
                continue
            try:
                tensor = handle.get_tensor(key)
            except Exception as error:
                raise DataError(f"cannot read tensor '{key}' ({error})", path=path, field=field) from None
            if (tensor.dtype == torch.uint8) != (field == "reference") or not (
                tensor.dtype == torch.uint8 or tensor.is_floating_point()
            ):
                wanted = "uint8" if field == "reference" else "floating-point"
                raise DataError(f"{window}: '{field}' is {str(tensor.dtype).removeprefix('torch.')}, the cache "
                                f"writes {wanted}", path=path, field=field)
            item[field] = tensor.float() / 255 if field == "reference" else tensor.float()
            if not torch.isfinite(item[field]).all():  # after the cast, which may overflow a float64
                raise DataError(f"{window}: '{field}' holds NaN or infinity", path=path, field=field)
        self._check_shapes(item, path, entry["key"])
        if "labels" in entry:
            item["labels"] = entry["labels"]
        item["num_frames"] = self.num_frames
        item["origin"] = {"shard": str(path)}
        return item

    def _check_shapes(self, item: dict, path: Path, key: str) -> None:
        codec, encoder = self.fingerprint["codec"], self.fingerprint["audio_encoder"]
        expected = {
            "latents": codec.get("latent_shape"),
            "rejected_latents": codec.get("latent_shape"),
            "audio": [round(self.num_frames * self.fingerprint["sample_rate"] / self.fingerprint["fps"])],
            "audio_features": encoder and encoder.get("feature_shape"),
            "reference": [3, *codec["frame_size"]] if codec.get("frame_size") else None,
        }
        for field, shape in expected.items():
            if field in item and shape is not None and list(item[field].shape) != list(shape):
                raise DataError(
                    f"tensor '{key}/{field}' has shape {list(item[field].shape)}, the cache's fingerprint says {list(shape)}",
                    path=path,
                    field=field,
                )

    def check(self, denoiser, fps: float, sample_rate: int, num_frames: int, source: Optional[str] = None) -> None:
        """Raise a ``DataError`` naming the setting if this run's denoiser or data settings differ from the cache's.

        Args:
            denoiser (PortraitDenoiser): the run's denoiser (its codec and audio encoder).
            fps (float): the run's video frame rate (``data.fps``).
            sample_rate (int): the run's audio rate (``data.sample_rate``).
            num_frames (int): the run's window length (``data.num_frames``).
            source (str | None): the run's training manifest (``data.train``), if it names one: it must be the
                one the cache was made from (the same file however written, or the same Hub id).
        """
        made_from = self.manifest["source"]
        if source is not None and not (
            Path(made_from).resolve() == Path(source).resolve() if Path(made_from).exists() and Path(source).exists()
            else made_from == source
        ):
            raise DataError(f"the latent cache was made from {made_from}, this run's training data is {source}",
                            path=self.path, field="source")
        cached = self.fingerprint
        again = "preprocess again with this run's settings"
        for name, value in {"fps": fps, "sample_rate": sample_rate, "num_frames": num_frames}.items():
            if value is None or abs(float(value) - float(cached[name])) > 1e-6:
                raise DataError(
                    f"the cache was made with {name}={cached[name]:g}, this run uses data.{name}={value}: {again}",
                    path=self.path,
                    field=name,
                )
        if abs(denoiser.fps - float(cached["fps"])) > 1e-6:
            raise DataError(
                f"the cache's audio features are aligned to {cached['fps']:g} fps, the denoiser runs at {denoiser.fps:g}",
                path=self.path,
                field="fps",
            )
        codec = cached["codec"]
        run = fingerprint(denoiser, fps, sample_rate, num_frames, tuple(codec["frame_size"]), cached.get("dtype", "float32"))
        for part in ("codec", "audio_encoder"):
            mine, theirs = run[part], cached[part]
            if mine == theirs:
                continue
            if mine is None or theirs is None:
                have = "has no audio encoder" if theirs is None else f"has audio features of {theirs['class']}"
                now = "none" if mine is None else mine["class"]
                raise DataError(f"the cache {have}, this run's denoiser has {now}: {again}", path=self.path, field=part)
            if mine["class"] != theirs["class"]:
                detail = f"class: {theirs['class']} in the cache, {mine['class']} in this run"
            elif mine["config"] != theirs["config"]:
                detail = _differences(theirs["config"], mine["config"])
            else:
                detail = _differences(theirs, mine)
            raise DataError(f"the {part} differs ({detail}): {again}", path=self.path, field=part)


class CachedClipDataset(Dataset):
    """Cached windows as the items ``collate_clips`` batches: the fields of a decoded clip, with ``latents`` (and
    ``rejected_latents``) in place of the pixels, and ``audio_features`` where an audio encoder made them.

    An index may be ``(index, epoch)``, as the data module's ``EpochSampler`` yields: windows are fixed, so the
    epoch changes nothing.

    Args:
        cache (LatentCache): the cache.
        indices (list[int] | None): the entries served, in order; ``None``: all of them.
        on_bad_sample (str): ``raise`` on an unreadable tensor, or ``skip``: count it and serve the next readable
            window in its place (``datamodule.load_or_stand_in``).
    """

    def __init__(self, cache: LatentCache, indices: Optional[list[int]] = None, on_bad_sample: str = "raise"):
        self.cache = cache
        self.indices = list(range(len(cache))) if indices is None else list(indices)
        self.on_bad_sample = on_bad_sample

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Union[int, tuple[int, int]]):
        # Imported here: the data module imports this file.
        from prefalign.data.skips import Skipped, load_or_stand_in

        def skipped(i: int, error: DataError) -> Skipped:
            entry = self.cache.entries[self.indices[i]]
            return Skipped(entry["id"], str(self.cache.folder / entry["shard"]), error.path, error.field, error.message)

        index = key[0] if isinstance(key, tuple) else key
        return load_or_stand_in(index, len(self), lambda i: self.cache.read(self.indices[i]), skipped,
                                self.on_bad_sample == "skip")
