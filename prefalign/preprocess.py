"""The latent cache's writer (``prefalign preprocess``): every clip window encoded once, by a recipe's codec and audio
encoder, into the safetensors shards that ``prefalign.data.cache`` reads."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from prefalign.build import build_from_recipe
from prefalign.data.cache import DTYPES, FORMAT, MANIFEST, VERSION, LatentCache, fingerprint, jsonable
from prefalign.data.errors import DataError
from prefalign.files import atomic_write, inside
from prefalign.secrets import get_logger

log = get_logger(__name__)


def _window(clip: dict, start: int, length: int, samples_per_frame: float) -> dict:
    """The decoded clip seen from frame ``start``: ``ClipDataset.crop`` without random start then cuts ``length``
    frames and ``round(length · samples_per_frame)`` samples from it, the same count for every window."""
    begin, count = round(start * samples_per_frame), round(length * samples_per_frame)
    audio = clip["audio"][begin : begin + count]
    view = {**clip, "frames": clip["frames"][start:], "audio": np.pad(audio, (0, count - audio.shape[0]))}
    for name in ("pose", "rejected"):
        if name in clip:
            view[name] = clip[name][start:]
    return view


class _ShardWriter:
    """Collects entries and writes them ``shard_size`` at a time, each shard atomically."""

    def __init__(self, folder: Path, shard_size: int):
        self.folder = folder
        self.shard_size = shard_size
        self.entries: list[dict] = []
        self.shards: list[str] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_count = 0
        self.fields: set[str] = set()

    def add(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        key = f"{len(self.entries):06d}"
        self.entries.append({**meta, "shard": f"shard-{len(self.shards):05d}.safetensors", "key": key})
        for name, tensor in tensors.items():
            self.pending[f"{key}/{name}"] = tensor.detach().cpu().contiguous()
        self.fields.update(tensors)
        if "labels" in meta:
            self.fields.add("labels")
        self.pending_count += 1
        if self.pending_count == self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending_count:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        with atomic_write(inside(self.folder, name)) as tmp:
            save_file(self.pending, str(tmp), metadata={"format": FORMAT, "version": str(VERSION)})
        self.shards.append(name)
        self.pending, self.pending_count = {}, 0


@dataclass
class _Pass:
    """What a pass over a split's rows found besides the windows it wrote."""

    skipped: list[dict] = field(default_factory=list)
    """The bad rows left out (under ``on_bad_sample: skip``), as the manifest lists them."""
    frame_size: Optional[tuple[int, int]] = None
    """The first clip's frame size, which every later clip must have."""
    cached_rows: set[int] = field(default_factory=set)
    """The rows with at least one window written."""


@torch.no_grad()
def _encode(denoiser, items: list[dict], num_frames: int, dtype: torch.dtype, device: torch.device) -> list[dict]:
    """One batch of cropped windows → the tensors each entry stores."""
    latents = denoiser.encode_video(torch.stack([item["video"] for item in items]).to(device))
    paired = [i for i, item in enumerate(items) if "rejected" in item]
    rejected = {}
    if paired:
        encoded = denoiser.encode_video(torch.stack([items[i]["rejected"] for i in paired]).to(device))
        rejected = dict(zip(paired, encoded))
    features = None
    if denoiser.audio_encoder is not None:
        audio = torch.stack([item["audio"] for item in items]).to(device)
        features = denoiser.audio_encoder(audio, num_frames, denoiser.fps)
    out = []
    for i, item in enumerate(items):
        tensors = {
            "latents": latents[i].to(dtype),
            "audio": item["audio"].float(),
            # Decoded references are uint8 / 255, so this round trip is exact.
            "reference": (item["reference"] * 255).round().to(torch.uint8),
        }
        if i in rejected:
            tensors["rejected_latents"] = rejected[i].to(dtype)
        if features is not None:
            tensors["audio_features"] = features[i].to(dtype)
        if "pose" in item:
            tensors["pose"] = item["pose"].float()
        out.append(tensors)
    return out


def _device(module: torch.nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def preprocess(
    denoiser,
    datamodule,
    out: str | Path,
    split: str = "train",
    stride: Optional[int] = None,
    shard_size: int = 256,
    dtype: str = "float32",
    batch_size: int = 8,
) -> LatentCache:
    """Encode every window of every clip of ``split`` once, into safetensors shards and a ``manifest.json``.

    Each clip is cut into windows of ``datamodule.num_frames`` frames starting every ``stride`` frames. Per window
    the cache holds the codec latents (and those of the rejected clip of a preference pair), the audio waveform,
    the frozen audio encoder's features, the reference image (uint8), the pose, and in the manifest the id, labels,
    source row and first frame. The manifest is written last, so a folder with one is a whole cache.

    Args:
        denoiser (PortraitDenoiser): its codec and audio encoder (frozen) encode, on the denoiser's device.
        datamodule (PortraitDataModule): decodes the rows, with its rates, ``num_frames`` and ``on_bad_sample``.
        out (str | Path): the cache folder (created; a cache already there is replaced).
        split (str): ``train``, ``val``, ``test`` (the data module's split of that name).
        stride (int | None): frames between window starts; ``None``: ``num_frames`` (windows do not overlap).
        shard_size (int): windows per shard file.
        dtype (str): dtype of latents and audio features on disk (``float32``, ``float16``, ``bfloat16``).
        batch_size (int): windows encoded together.

    Returns:
        LatentCache: the cache just written.
    """
    stride = _check_settings(denoiser, datamodule, stride, shard_size, dtype, batch_size)
    dataset = datamodule.dataset(split, cached=False)  # decode the clips, even where a recipe names a cache
    dataset.random_crop = False  # windows start where the stride says
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    # A manifest left from an earlier cache would describe the shards this run overwrites.
    (folder / MANIFEST).unlink(missing_ok=True)
    writer = _ShardWriter(folder, shard_size)
    found = _encode_split(denoiser, dataset, writer, datamodule.num_frames, stride, dtype, batch_size)
    if not writer.entries:
        raise DataError(f"no window to cache: every row of the {split} split was skipped", path=dataset.manifest.source)

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": fingerprint(
            denoiser, datamodule.fps, datamodule.sample_rate, datamodule.num_frames, found.frame_size, dtype
        ),
        "source": dataset.manifest.source,
        "split": split,
        "stride": stride,
        "fields": sorted(writer.fields),
        "counts": {
            "rows": len(dataset.indices),
            "cached_rows": len(found.cached_rows),
            "entries": len(writer.entries),
            "skipped": len(found.skipped),
            "shards": len(writer.shards),
        },
        "shards": writer.shards,
        "entries": writer.entries,
        "skipped": found.skipped,
    }
    _write_manifest(folder, manifest)
    return LatentCache(folder)


def _check_settings(denoiser, datamodule, stride: Optional[int], shard_size: int, dtype: str, batch_size: int) -> int:
    """Refuse settings the cache cannot be made with, before any clip is decoded: no window length, sizes below 1,
    an unknown dtype, a window the codec cannot encode, an audio encoder that trains, or rates that differ between
    the denoiser and the data module. Returns the stride (``num_frames`` where ``None``)."""
    num_frames = datamodule.num_frames
    if not num_frames:
        raise ValueError("set data.num_frames: the cache stores windows of one length")
    stride = num_frames if stride is None else stride
    for name, value in {"stride": stride, "shard_size": shard_size, "batch_size": batch_size}.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    denoiser.codec.num_latent_frames(num_frames)  # a window length the codec cannot encode fails now, not per clip
    encoder = denoiser.audio_encoder
    if encoder is not None and any(p.requires_grad for p in encoder.parameters()):
        raise ValueError(
            "this denoiser trains its audio encoder (train_audio_encoder): cached audio features would go stale as "
            "it learns; preprocess with the encoder frozen, and the module recomputes features from the cached audio"
        )
    if abs(denoiser.fps - datamodule.fps) > 1e-6:
        raise ValueError(f"the denoiser's fps ({denoiser.fps:g}) and the data module's ({datamodule.fps:g}) differ")
    if encoder is not None and encoder.sample_rate != datamodule.sample_rate:
        raise ValueError(
            f"the audio encoder takes {encoder.sample_rate} Hz, the data module gives {datamodule.sample_rate} Hz"
        )
    return stride


def _encode_split(
    denoiser, dataset, writer: _ShardWriter, num_frames: int, stride: int, dtype: str, batch_size: int
) -> _Pass:
    """Encode every window of the dataset's rows, ``batch_size`` at a time, into ``writer`` (its last shard
    flushed), with the denoiser in eval mode meanwhile."""
    found = _Pass()
    was_training = denoiser.training
    denoiser.eval()
    device = _device(denoiser)
    try:
        batch: list[tuple[dict, dict]] = []
        for meta, item in _windows(dataset, stride, found):
            batch.append((meta, item))
            if len(batch) == batch_size:
                _write(writer, denoiser, batch, num_frames, dtype, device)
                found.cached_rows.update(m["row"] for m, _ in batch)
                batch = []
        if batch:
            _write(writer, denoiser, batch, num_frames, dtype, device)
            found.cached_rows.update(m["row"] for m, _ in batch)
        writer.flush()
    finally:
        denoiser.train(was_training)
    return found


def _write_manifest(folder: Path, manifest: dict) -> None:
    """Remove the shards of an earlier cache that this one does not name, then write the manifest (atomically)."""
    for stale in folder.glob("shard-*.safetensors"):
        if stale.name not in manifest["shards"]:
            stale.unlink()
    with atomic_write(inside(folder, MANIFEST)) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))


def _write(writer: _ShardWriter, denoiser, batch: list[tuple[dict, dict]], num_frames: int, dtype: str, device) -> None:
    encoded = _encode(denoiser, [item for _, item in batch], num_frames, getattr(torch, dtype), device)
    for (meta, _), tensors in zip(batch, encoded):
        writer.add(meta, tensors)


def _windows(dataset, stride: int, found: _Pass) -> Iterator[tuple[dict, dict]]:
    """``(entry metadata, cropped item)`` for every window of every row, bad rows raised or skipped (into
    ``found.skipped``) as the data module's ``on_bad_sample`` says."""
    manifest, length = dataset.manifest, dataset.num_frames
    samples_per_frame = dataset.sample_rate / dataset.fps
    for row_index in dataset.indices:
        row = manifest.rows[row_index]
        row_id = str(row.get("id", row_index))
        try:
            if row.get("video") is None:
                raise DataError(f"row {row_index} has no video: there is nothing to encode", path=manifest.source, field="video")
            clip = dataset.decode(row, row_index)
            size = tuple(clip["frames"].shape[1:3])
            if found.frame_size is None:
                found.frame_size = size
            elif size != found.frame_size:
                height, width = found.frame_size
                raise DataError(
                    f"video is {size[0]}x{size[1]}, the clips cached before it {height}x{width}",
                    path=manifest.resolve(row["video"]),
                    field="video",
                )
        except DataError as error:
            if dataset.on_bad_sample == "raise":
                raise
            log.warning("skipping a bad sample: %s", error)
            found.skipped.append(
                {"row": row_index, "id": row_id, "path": error.path, "field": error.field, "reason": error.message}
            )
            continue
        total = clip["frames"].shape[0]
        for start in range(0, total - length + 1, stride):
            item = dataset.crop(_window(clip, start, length, samples_per_frame))
            meta = {"id": item["id"], "row": row_index, "start_frame": start}
            if "labels" in item:
                meta["labels"] = jsonable(item["labels"])
            yield meta, item


def preprocess_command(
    recipe: str,
    out: str,
    split: str = "train",
    stride: Optional[int] = None,
    shard_size: int = 256,
    dtype: Literal["float32", "float16", "bfloat16"] = "float32",
    batch_size: int = 8,
    device: Optional[str] = None,
) -> None:
    """Encode a recipe's clips once into a latent cache (codec latents, audio features) for training without decoding.

    ``prefalign preprocess --recipe recipe.yaml --out DIR``. (Not ``--config``: jsonargparse reserves that name
    and drops a function parameter called so.)

    Args:
        recipe: the training recipe (YAML) whose ``model.denoiser`` encodes and whose ``data`` gives the clips.
        out: the cache folder to write.
        split: which of the data module's splits to encode (``train``, ``val``, ``test``).
        stride: frames between the starts of a clip's windows (``data.num_frames`` long); default: ``num_frames``.
        shard_size: windows per safetensors shard.
        dtype: dtype of the cached latents and audio features (``float32``, ``float16``, ``bfloat16``).
        batch_size: windows encoded together.
        device: where to encode (``cuda``, ``cpu``, ...); default: ``cuda`` when there is one.
    """
    module, datamodule = build_from_recipe(recipe)
    denoiser = module.denoiser.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cache = preprocess(denoiser, datamodule, out, split, stride, shard_size, dtype, batch_size)
    counts = cache.manifest["counts"]
    print(
        f"cached {counts['entries']} windows of {counts['cached_rows']} of {counts['rows']} clips "
        f"({counts['skipped']} skipped) in {counts['shards']} shards: {cache.path}"
    )
