"""PortraitDataModule: decodes manifest rows into clip tensors, with a train/val split and bad-sample handling."""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
from collections import Counter
from typing import Iterator, Literal, Optional, Union

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from prefalign.data import media
from prefalign.data.errors import DataError, require_fields
from prefalign.data.schema import MEDIA_COLUMNS, Manifest, load_manifest
from prefalign.data.skips import Skipped, load_or_stand_in
from prefalign.secrets import get_logger

log = get_logger(__name__)


#: Keypoints are image fractions, x / width and y / height; points a little outside the frame (a hand raised out
#: of shot) are normal, values far outside are pixels or another convention, and are refused.
POSE_RANGE = (-0.5, 1.5)
#: A pose file larger than this is refused before it is read: 3 minutes at 25 fps of 133 whole-body keypoints is
#: 7 MB as float64 .npy, about 20 MB as JSON.
MAX_POSE_BYTES = 64 * 2**20


def read_pose(path: str, field: str = "pose") -> np.ndarray:
    """Keypoints per frame ``[T, K, 2]`` (x, y in [0, 1]) from a .npy or .json file; a damaged, pickled,
    non-numeric, misshapen or non-finite array, a file over ``MAX_POSE_BYTES`` (or an .npy header that claims more
    data than its file holds), or values outside ``POSE_RANGE`` is a ``DataError``."""
    if not path.endswith((".npy", ".json")):
        raise DataError("pose must be a .npy or .json file", path=path, field=field)
    media.check_file(path, field)
    size = os.stat(path).st_size
    if size > MAX_POSE_BYTES:
        raise DataError(f"the file is {size} bytes, above the limit of {MAX_POSE_BYTES} (MAX_POSE_BYTES)", path=path,
                        field=field)
    try:
        with open(path, "rb") as handle:
            if path.endswith(".json"):
                pose = np.asarray(json.load(handle))
            elif handle.read(6) == b"\x93NUMPY":  # else np.load would try it as a zip archive or a pickle
                handle.seek(0)
                _check_npy_header(handle, size, path, field)
                handle.seek(0)
                pose = np.load(handle, allow_pickle=False)
            else:
                pose = None
    except DataError:
        raise
    # Any error: np.load parses a damaged header as a Python literal (SyntaxError, TokenError) and raises EOFError
    # on a cut one; json.load a deep nesting (RecursionError); whatever they return is checked below.
    except Exception as error:
        raise DataError(f"cannot read keypoints ({type(error).__name__}: {error})", path=path, field=field) from None
    if pose is None:
        raise DataError("not an .npy array (no NUMPY header)", path=path, field=field)
    # Before the cast, which would parse strings as numbers, drop imaginary parts or fail on objects.
    if pose.dtype.kind not in "fiu":
        raise DataError(f"keypoints must be numbers, got {pose.dtype} values", path=path, field=field)
    if pose.ndim != 3 or pose.shape[1] == 0 or pose.shape[-1] != 2:
        raise DataError(f"expected keypoints of shape [frames, points, 2], got {list(pose.shape)}", path=path, field=field)
    pose = pose.astype(np.float32)
    if not np.isfinite(pose).all():
        raise DataError("keypoints contain NaN or infinity", path=path, field=field)
    low, high = (float(pose.min()), float(pose.max())) if pose.size else POSE_RANGE
    if low < POSE_RANGE[0] or high > POSE_RANGE[1]:
        raise DataError(
            f"keypoints range over [{low:.4g}, {high:.4g}], outside {list(POSE_RANGE)}: they must be fractions of the "
            "frame (x / width, y / height), not pixels",
            path=path,
            field=field,
        )
    return pose


def _check_npy_header(handle, size: int, path: str, field: str) -> None:
    """Refuse an .npy whose header claims more data than the file holds before ``np.load`` allocates it (it
    allocates what the header says first: a 100-byte file may claim 50 GB)."""
    version = np.lib.format.read_magic(handle)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise DataError(f"unsupported .npy version {version[0]}.{version[1]}", path=path, field=field)
    shape, _, dtype = readers[version](handle)
    if dtype.hasobject:
        raise DataError("keypoints must be numbers, got Python objects (a pickled array)", path=path, field=field)
    needed = math.prod(shape) * dtype.itemsize
    if needed > size - handle.tell():
        raise DataError(f"the header says {list(shape)} {dtype} ({needed} bytes), the file holds "
                        f"{size - handle.tell()} bytes of data", path=path, field=field)


class ClipDataset(Dataset):
    """Decodes one manifest row into ``id``, ``video [T,3,H,W]``, ``audio [S]``, ``reference [3,H,W]``, ``pose [T,K,2]``.

    Rows without a video (conditions for ``predict``, or GRPO's rollouts) give ``audio``, ``reference``,
    ``num_frames`` (``num_frames``, else all the frames the audio covers) and, when the row names one, ``pose``
    cut to those frames (see :meth:`_load_conditions`). With ``on_bad_sample="skip"`` a bad row gives a
    :class:`Skipped` record (counted by the collate) and replaced by a stand-in (:func:`load_or_stand_in`). An index
    may be ``(index, epoch)`` (what :class:`EpochSampler` yields): the random crop is then drawn from
    ``(seed, epoch, row)``, the same in every worker and after a resume.

    ``fields`` are the batch fields the run reads (``PortraitDataModule.use_fields``; None: all). Pose is read only
    when it is one of them: then every row of a manifest that gives pose must give it (a row without is bad);
    else the column is ignored, neither read nor checked. Each item carries ``origin``, the manifest (``shard``)
    and the file of each field the row names, for the collate to name a clip that does not fit its batch.
    """

    def __init__(
        self,
        manifest: Manifest,
        indices: list[int],
        sample_rate: int,
        fps: float,
        num_frames: Optional[int],
        random_crop: bool,
        on_bad_sample: str,
        resample_audio: bool,
        keep_decoded: bool = False,
        seed: int = 0,
        fields: Optional[set[str]] = None,
        max_frames: int = media.MAX_FRAMES,
        max_frame_pixels: int = media.MAX_FRAME_PIXELS,
    ):
        self.manifest = manifest
        self.indices = indices
        self.max_frames = max_frames
        self.max_frame_pixels = max_frame_pixels
        self.rows_with_pose = sum(1 for row in manifest.rows if row.get("pose"))
        self.loads_pose = self.rows_with_pose > 0 and (fields is None or "pose" in fields)
        self.sample_rate = sample_rate
        self.fps = fps
        self.num_frames = num_frames
        self.random_crop = random_crop
        self.on_bad_sample = on_bad_sample
        self.resample_audio = resample_audio
        self.seed = seed
        # Decoded clips by row, when small enough to keep (each worker process keeps its own).
        self.decoded: Optional[dict[int, dict]] = {} if keep_decoded else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: Union[int, tuple[int, int]]) -> Union[dict, Skipped]:
        index, epoch = key if isinstance(key, tuple) else (key, None)

        def load(i: int) -> dict:
            return self.load(self.manifest.rows[self.indices[i]], self.indices[i], epoch)

        def skipped(i: int, error: DataError) -> Skipped:
            row_id = str(self.manifest.rows[self.indices[i]].get("id", self.indices[i]))
            return Skipped(row_id, self.manifest.source, error.path, error.field, error.message)

        return load_or_stand_in(index, len(self), load, skipped, self.on_bad_sample == "skip")

    def load(self, row: dict, row_index: int, epoch: Optional[int] = None) -> dict:
        if row.get("video") is None:
            return self._load_conditions(row, row_index, self.sample_rate / self.fps)
        clip = self.decoded.get(row_index) if self.decoded is not None else None
        if clip is None:
            clip = self.decode(row, row_index)
            if self.decoded is not None:
                self.decoded[row_index] = clip
        return self.crop(clip, None if epoch is None else np.random.default_rng([self.seed, epoch, row_index]))

    def decode(self, row: dict, row_index: int) -> dict:
        """The whole clip of a row, checked: uint8 frames, audio covering them, reference, pose."""
        samples_per_frame = self.sample_rate / self.fps
        video_path = self.manifest.resolve(row["video"])
        frames, fps = media.read_video(video_path, field="video", max_frames=self.max_frames,
                                       max_frame_pixels=self.max_frame_pixels)
        self._check_fps(fps, video_path, "video")
        total = frames.shape[0]
        if self.num_frames and total < self.num_frames:
            raise DataError(
                f"video has {total} frames, fewer than the {self.num_frames} needed", path=video_path, field="video"
            )
        audio_path = self.manifest.resolve(row["audio"]) if row.get("audio") else video_path
        audio = media.read_audio(audio_path, self.sample_rate, resample=self.resample_audio, field="audio")
        needed = round(total * samples_per_frame)
        if audio.shape[0] < needed - samples_per_frame:
            raise DataError(
                f"audio lasts {audio.shape[0] / self.sample_rate:.3f} s but the video {total / self.fps:.3f} s",
                path=audio_path,
                field="audio",
            )
        clip = {
            "id": str(row.get("id", row_index)),
            "frames": frames,
            "audio": np.pad(audio[:needed], (0, max(0, needed - audio.shape[0]))),
            "reference": self._reference(row, frames[0], frames.shape[1:3]),
            "origin": self._origin(row),
        }
        pose_path = self._pose_path(row, row_index)
        if pose_path is not None:
            pose = read_pose(pose_path)
            if pose.shape[0] != total:
                raise DataError(f"pose has {pose.shape[0]} frames, the video {total}", path=pose_path, field="pose")
            clip["pose"] = pose
        if row.get("rejected"):
            clip["rejected"] = self._rejected(self.manifest.resolve(row["rejected"]), frames.shape)
        if "labels" in row:
            clip["labels"] = row["labels"]
        return clip

    def _origin(self, row: dict) -> dict[str, str]:
        origin = {"shard": self.manifest.source}
        origin.update({column: self.manifest.resolve(row[column]) for column in MEDIA_COLUMNS if row.get(column)})
        return origin

    def _check_fps(self, fps: float, path: str, field: str) -> None:
        if abs(fps - self.fps) > 0.01:
            raise DataError(f"video is {fps:g} fps, the data module expects {self.fps:g} (data.fps): {media.CFR_HINT}",
                            path=path, field=field)

    def _pose_path(self, row: dict, row_index: int) -> Optional[str]:
        """The row's pose file where the run reads pose, else None (the column is ignored)."""
        if not self.loads_pose:
            return None
        if not row.get("pose"):
            raise DataError(
                f"row {row_index} (id {row.get('id', row_index)!r}) has no pose, which {self.rows_with_pose} of the "
                f"manifest's {len(self.manifest.rows)} rows give and this run reads: give it in every row "
                "(with data.on_bad_sample: skip, rows without are skipped and counted)",
                path=self.manifest.source,
                field="pose",
            )
        return self.manifest.resolve(row["pose"])

    def _rejected(self, path: str, shape: tuple) -> np.ndarray:
        """The rejected clip of a preference pair: same length, size and rate as the chosen one."""
        frames, fps = media.read_video(path, field="rejected", max_frames=self.max_frames,
                                       max_frame_pixels=self.max_frame_pixels)
        self._check_fps(fps, path, "rejected")
        if frames.shape != shape:
            raise DataError(
                f"rejected clip is {list(frames.shape[:3])} (frames, height, width), the chosen one {list(shape[:3])}",
                path=path,
                field="rejected",
            )
        return frames

    def crop(self, clip: dict, rng: Optional[np.random.Generator] = None) -> dict:
        """``num_frames`` consecutive frames (random start when training: from ``rng`` if given, else torch's
        global generator) and the audio and pose that go with them."""
        total = clip["frames"].shape[0]
        length = self.num_frames or total
        start = 0
        if self.random_crop:
            start = int(rng.integers(0, total - length + 1)) if rng is not None else int(torch.randint(0, total - length + 1, ()))
        samples_per_frame = self.sample_rate / self.fps
        begin, end = round(start * samples_per_frame), round((start + length) * samples_per_frame)
        item = {
            "id": clip["id"],
            "video": torch.from_numpy(clip["frames"][start : start + length]).permute(0, 3, 1, 2).float() / 255,
            "audio": torch.from_numpy(clip["audio"][begin:end].copy()),
            "reference": clip["reference"],
        }
        if "pose" in clip:
            item["pose"] = torch.from_numpy(clip["pose"][start : start + length].copy())
        if "rejected" in clip:
            item["rejected"] = torch.from_numpy(clip["rejected"][start : start + length]).permute(0, 3, 1, 2).float() / 255
        if "labels" in clip:
            item["labels"] = clip["labels"]
        if "origin" in clip:
            item["origin"] = clip["origin"]
        return item

    def _load_conditions(self, row: dict, row_index: int, samples_per_frame: float) -> dict:
        """A row without a video: the audio sets the clip's length (``num_frames``, else all the frames it covers).
        A pose must cover that length too. A longer one is cut to its first frames, as the audio is, so both start
        at the clip's first frame; a shorter one is an error, not padded: nothing says what the missing frames hold."""
        item = {"id": str(row.get("id", row_index))}
        audio_path = self.manifest.resolve(row["audio"])
        audio = media.read_audio(audio_path, self.sample_rate, resample=self.resample_audio, field="audio")
        available = int(audio.shape[0] // samples_per_frame)
        length = self.num_frames or available
        if available < length or length < 1:
            raise DataError(f"audio covers {available} frames, fewer than the {length} needed", path=audio_path, field="audio")
        item["num_frames"] = length
        item["audio"] = torch.from_numpy(audio[: round(length * samples_per_frame)].copy())
        item["reference"] = self._reference(row, None, None)
        item["origin"] = self._origin(row)
        pose_path = self._pose_path(row, row_index)
        if pose_path is not None:
            pose = read_pose(pose_path)
            if pose.shape[0] < length:
                raise DataError(f"pose has {pose.shape[0]} frames, fewer than the {length} needed", path=pose_path,
                                field="pose")
            item["pose"] = torch.from_numpy(pose[:length].copy())
        return item

    def _reference(self, row: dict, first_frame: Optional[np.ndarray], size) -> torch.Tensor:
        if row.get("reference"):
            path = self.manifest.resolve(row["reference"])
            image = media.read_image(path, field="reference", max_pixels=self.max_frame_pixels)
            if size is not None and tuple(image.shape[:2]) != tuple(size):
                raise DataError(
                    f"reference image is {image.shape[0]}x{image.shape[1]}, the video {size[0]}x{size[1]}",
                    path=path,
                    field="reference",
                )
        else:
            image = first_frame
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255


#: Where a field's frames (or samples) run: clips differing only there differ in length, not in frame size.
LENGTH_AXIS = {"video": 0, "rejected": 0, "pose": 0, "audio": 0, "audio_features": 0, "latents": 1,
               "rejected_latents": 1}
#: Item keys the collate reads but does not batch.
_NOT_BATCHED = ("id", "skipped_samples", "origin")


def collate_clips(items: list[Union[dict, Skipped, None]], on_bad_sample: str = "raise") -> dict:
    """Stack clips into a batch; skipped items (:class:`Skipped` records, or ``None``) are dropped, counted in
    ``batch["skipped"]`` and listed in ``batch["skipped_samples"]``.

    Clips that do not fit the rest of their batch (a field of another shape, or a field the others lack or have)
    are a ``DataError`` naming the clip's file (its ``origin``) and field; under ``on_bad_sample="skip"`` they
    are dropped and counted instead, the batch keeping its most common shape."""
    kept = [item for item in items if isinstance(item, dict)]
    skipped = [item for item in items if isinstance(item, Skipped)]
    kept, misfits = _fitting(kept, skip=on_bad_sample == "skip")
    skipped += misfits
    skipped += [record for item in kept for record in item.get("skipped_samples", [])]  # items stood in for
    count = len(skipped) + sum(item is None for item in items)
    batch: dict = {"skipped": count, "size": len(kept), "id": [item["id"] for item in kept]}
    if skipped:
        batch["skipped_samples"] = skipped
    if not kept:
        return batch
    for key in kept[0]:
        if key in _NOT_BATCHED:
            continue
        values = [item[key] for item in kept]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.as_tensor(values) if isinstance(values[0], (int, float)) else values
    return batch


def _fitting(items: list[dict], skip: bool) -> tuple[list[dict], list[Skipped]]:
    """The items that agree with the most common shape of every field (ties: the first item's), and
    :class:`Skipped` records of the others (with those they stood in for); without ``skip`` the first misfit
    raises."""
    misfits: list[Skipped] = []
    keys = [key for key in dict.fromkeys(key for item in items for key in item) if key not in _NOT_BATCHED]
    for key in keys:
        signatures = [_signature(item, key) for item in items]
        common = Counter(signatures).most_common(1)[0][0]
        if all(signature == common for signature in signatures):
            continue
        fit = []
        for item, signature in zip(items, signatures):
            if signature == common:
                fit.append(item)
                continue
            origin = item.get("origin", {})
            # A field derived from another (audio from the video's track, ...) names the file it came from.
            path = origin.get(key) or origin.get("video") or origin.get("audio") or origin.get("shard")
            shard = origin.get("shard")
            reason = f"clip {item['id']!r}: {_misfit(key, signature, common)}"
            if not skip:
                raise DataError(reason, path=path, field=key)
            log.warning("skipping a clip that does not fit its batch: %s", DataError(reason, path=path, field=key))
            misfits.append(Skipped(item["id"], shard or "batch", path, key, reason))
            misfits += item.get("skipped_samples", [])
        items = fit
    return items, misfits


def _signature(item: dict, key: str):
    if key not in item:
        return "absent"
    return tuple(item[key].shape) if isinstance(item[key], torch.Tensor) else "present"


def _misfit(key: str, signature, common) -> str:
    if signature == "absent" or common == "absent":
        have, lack = ("has no", "do") if signature == "absent" else ("has", "do not")
        return f"{have} '{key}' and the other clips of its batch {lack}: give it in every row or in none"
    if isinstance(signature, tuple) and isinstance(common, tuple) and len(signature) == len(common):
        differ = {axis for axis, (a, b) in enumerate(zip(signature, common)) if a != b}
        text = f"'{key}' is {list(signature)}, {list(common)} in the other clips of its batch"
        if differ == {LENGTH_AXIS.get(key)}:
            return f"{text}: clips differ in length (set data.num_frames to crop them to one, or batch_size 1)"
        if key == "pose":
            return f"{text}: every pose file must give the same keypoints"
        return f"{text}: clips of one batch must have one frame size (resize the videos to one size, or batch_size 1)"
    return f"'{key}' is {signature}, {common} in the other clips of its batch"


def check_unique_ids(manifest: Manifest, indices: list[int], split: str) -> None:
    """Refuse a ``test`` or ``predict`` manifest whose rows repeat an id: each id names its output video (and its row
    of the evaluation table), so a repeat would overwrite another row's video. Names the manifest and the rows."""
    seen: dict[str, int] = {}
    for index in indices:
        clip_id = str(manifest.rows[index].get("id", index))
        if clip_id in seen:
            raise DataError(f"rows {seen[clip_id]} and {index} of the {split} manifest share the id "
                            f"{clip_id[:200]!r}: each id names its own output video, so ids must be unique",
                            path=manifest.source, field="id")
        seen[clip_id] = index


class EpochSampler(DistributedSampler):
    """The training order: a permutation per epoch drawn from ``(seed, epoch)``, split across ranks, that can
    start in the middle of an epoch (an exact resume).

    It yields ``(index, epoch)`` so that the dataset draws each clip's random crop from ``(seed, epoch, row)``
    too. Being a ``DistributedSampler``, Lightning sets its epoch and does not replace it under DDP/FSDP; the
    world size and rank come from ``torch.distributed`` when it is initialised, else it is a single process.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int = 0, shuffle: bool = True):
        initialised = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if initialised else 1,
            rank=dist.get_rank() if initialised else 0,
            shuffle=shuffle,
            seed=seed,
        )
        self.batch_size = batch_size
        self.resume_at: Optional[tuple[int, int]] = None
        """``(epoch, batches)``: in that epoch, skip the batches a resumed run already trained on."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = list(super().__iter__())
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            order = order[self.resume_at[1] * self.batch_size :]
        return iter([(index, self.epoch) for index in order])


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's integers too


def check_options(**options: tuple) -> None:
    """``name=(value, allowed, ok)`` for each of the data module's options: the first not ``ok`` is a ``ValueError``
    naming ``data.<name>`` and its allowed values, at construction, before any data is read."""
    for name, (value, allowed, ok) in options.items():
        if not ok:
            raise ValueError(f"data.{name} must be {allowed}, got {value!r}")


class PortraitDataModule(L.LightningDataModule):
    """Clips for training, validation, testing and prediction, from manifests in the clip schema.

    Args:
        train (str | None): training manifest (jsonl, json, parquet, csv) or Hub dataset id.
        val (str | None): validation manifest; if not given, ``val_fraction`` of ``train`` is held out.
        test (str | None): held-out manifest for ``prefalign test``.
        predict (str | None): manifest of conditions to animate (``audio`` + ``reference`` and, for a
            skeleton-conditioned denoiser, ``pose``; or ``video``).
        val_fraction (float): share of ``train`` held out for validation when ``val`` is not given.
        batch_size (int): clips per training batch.
        eval_batch_size (int | None): clips per validation/test/predict batch (defaults to ``batch_size``).
        num_workers (int): decoding worker processes.
        sample_rate (int): audio rate the model takes; other rates are resampled with soxr.
        resample_audio (bool): resample audio at another rate (else such a file is an error).
        fps (float): video frame rate the model takes; clips at another rate are an error.
        num_frames (int | None): frames per training clip, cropped at a random start (validation: the
            first frames); ``None`` uses whole clips, which must then all have the same length.
        on_bad_sample (str): ``raise`` stops at the first bad clip with an error naming the file and field;
            ``skip`` drops it, logs why, and counts it (``train/skipped_samples``, and a summary by shard at the
            end of each epoch).
        seed (int): seed of the train/val split, the training order and the random crops (each a function of
            the seed, the epoch and the clip, so that a resumed run sees exactly the data the first one would).
        keep_decoded (bool): keep decoded clips in memory after their first use (small datasets such as the
            demo's; at scale, decode in worker processes instead).
        latent_cache (str | None): a folder written by ``prefalign preprocess``: training then reads its codec
            latents, audio and features and never decodes video (validation still decodes ``val``). It must have
            been made with this run's codec, audio encoder, fps, sample rate and ``num_frames`` (checked at setup).
        max_frames (int): a video of more frames than this is a bad sample, refused from its header before
            decoding (or counted as it decodes where the header lies): 4500, 3 minutes at 25 fps.
        max_frame_pixels (int): a video frame or reference image of more pixels than this is a bad sample, refused
            from its header before decoding: 2048², which 1080p either way up fits and 4K does not. One clip
            decodes to at most ``max_frames × max_frame_pixels × 3`` bytes.

    The fields a run reads: the module's setup calls :meth:`use_fields` with them. Columns it does not read
    (``pose`` for a denoiser without a skeleton and an algorithm and rewards that read none) are then neither
    loaded nor checked.
    """

    def __init__(
        self,
        train: Optional[str] = None,
        val: Optional[str] = None,
        test: Optional[str] = None,
        predict: Optional[str] = None,
        val_fraction: float = 0.1,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        sample_rate: int = 16000,
        resample_audio: bool = True,
        fps: float = 25.0,
        num_frames: Optional[int] = None,
        on_bad_sample: Literal["raise", "skip"] = "raise",
        seed: int = 0,
        keep_decoded: bool = False,
        latent_cache: Optional[str] = None,
        max_frames: int = media.MAX_FRAMES,
        max_frame_pixels: int = media.MAX_FRAME_PIXELS,
    ):
        super().__init__()
        check_options(
            val_fraction=(val_fraction, "a number in [0, 1)", 0.0 <= val_fraction < 1.0),
            batch_size=(batch_size, "an integer >= 1", _is_int(batch_size) and batch_size >= 1),
            eval_batch_size=(eval_batch_size, "an integer >= 1, or null (= batch_size)",
                             eval_batch_size is None or _is_int(eval_batch_size) and eval_batch_size >= 1),
            num_workers=(num_workers, "an integer >= 0 (0: decode in the main process)",
                         _is_int(num_workers) and num_workers >= 0),
            sample_rate=(sample_rate, "an integer >= 1 (samples per second)",
                         _is_int(sample_rate) and sample_rate >= 1),
            fps=(fps, "a finite number > 0 (frames per second)", math.isfinite(fps) and fps > 0),
            num_frames=(num_frames, "an integer >= 1, or null (whole clips)",
                        num_frames is None or _is_int(num_frames) and num_frames >= 1),
            on_bad_sample=(on_bad_sample, "'raise' or 'skip'", on_bad_sample in ("raise", "skip")),
            seed=(seed, f"an integer in [0, {2**63 - 1}]", _is_int(seed) and 0 <= seed < 2**63),
            max_frames=(max_frames, "an integer >= 1", _is_int(max_frames) and max_frames >= 1),
            max_frame_pixels=(max_frame_pixels, "an integer >= 1", _is_int(max_frame_pixels) and max_frame_pixels >= 1),
        )
        self.sources = {"train": train, "val": val, "test": test, "predict": predict}
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.sample_rate = sample_rate
        self.resample_audio = resample_audio
        self.fps = fps
        self.num_frames = num_frames
        self.on_bad_sample = on_bad_sample
        self.seed = seed
        self.keep_decoded = keep_decoded
        self.latent_cache = latent_cache
        self.max_frames = max_frames
        self.max_frame_pixels = max_frame_pixels
        self.fields: Optional[set[str]] = None
        """The batch fields the run reads (:meth:`use_fields`); None: every column the rows give."""
        self._latent_cache = None
        self._manifests: dict[str, Manifest] = {}
        self._splits: dict[str, tuple[Manifest, list[int]]] = {}
        self._resume_at: Optional[tuple[int, int]] = None
        self._train_batches: Counter = Counter()  # "empty" and "kept" training batches of this fit
        self._counted_epoch: Optional[int] = None

    def _manifest(self, source: str) -> Manifest:
        if source not in self._manifests:
            self._manifests[source] = load_manifest(source)
        return self._manifests[source]

    def split(self, name: str) -> tuple[Manifest, list[int]]:
        """The manifest and row indices of ``train``, ``val``, ``test`` or ``predict``."""
        if name in self._splits:
            return self._splits[name]
        source = self.sources[name]
        held_out = name in ("train", "val") and self.sources["val"] is None and self.val_fraction > 0
        if name == "val" and held_out:
            source = self.sources["train"]
        if source is None:
            raise ValueError(f"no {name} data: set data.{name} (a manifest path or a Hub dataset id)")
        manifest = self._manifest(source)
        indices = list(range(len(manifest.rows)))
        if held_out:
            order = np.random.default_rng(self.seed).permutation(len(indices)).tolist()
            n_val = max(1, math.floor(len(indices) * self.val_fraction))
            indices = sorted(order[:n_val]) if name == "val" else sorted(order[n_val:])
        if name in ("test", "predict"):
            check_unique_ids(manifest, indices, name)
        self._splits[name] = (manifest, indices)
        return self._splits[name]

    def latent_cache_of(self, name: str):
        """The latent cache that feeds split ``name`` (``train`` when ``latent_cache`` is set), else None."""
        if name != "train" or self.latent_cache is None:
            return None
        if self._latent_cache is None:
            from prefalign.data.cache import LatentCache

            self._latent_cache = LatentCache(self.latent_cache)
        return self._latent_cache

    def source(self, name: str) -> str:
        cache = self.latent_cache_of(name)
        return str(cache.path) if cache is not None else self.split(name)[0].source

    def available_fields(self, name: str) -> set[str]:
        """The fields split ``name`` gives: those of every row, and under ``on_bad_sample: skip`` also a pose that
        only some rows give (the rows without are then skipped and counted: see :class:`ClipDataset`)."""
        cache = self.latent_cache_of(name)
        if cache is not None:
            return set(cache.fields)
        manifest = self.split(name)[0]
        partial = manifest.fields(partial=True) & {"pose"} if self.on_bad_sample == "skip" else set()
        return manifest.fields() | partial

    def check_can_feed(self, denoiser, algorithm) -> None:
        """Fail at setup, not mid-epoch, when the training split cannot feed the run: a latent cache made for
        another denoiser or clip length, a field the algorithm (``algorithm.check_fields``) or the denoiser's
        conditioning (``denoiser.required_fields``) needs and the data lacks."""
        cache = self.latent_cache_of("train")
        if cache is not None:
            cache.check(denoiser, self.fps, self.sample_rate, self.num_frames, source=self.sources["train"])
        available, source = self.available_fields("train"), self.source("train")
        algorithm.check_fields(available, source)
        require_fields(denoiser.required_fields, available, source, "the denoiser's conditioning")

    def use_fields(self, fields) -> None:
        """Load only the optional columns (``pose``) among ``fields``, the batch fields the run reads. The
        module's setup calls it, before the dataloaders are made; without a call every column is loaded."""
        self.fields = set(fields)

    def dataset(self, name: str, cached: bool = True) -> Dataset:
        """The split's dataset: the latent cache's windows where one feeds it (and ``cached``), else decoded clips."""
        cache = self.latent_cache_of(name) if cached else None
        if cache is not None:
            from prefalign.data.cache import CachedClipDataset

            return CachedClipDataset(cache, None, on_bad_sample=self.on_bad_sample)
        manifest, indices = self.split(name)
        return ClipDataset(
            manifest,
            indices,
            sample_rate=self.sample_rate,
            fps=self.fps,
            num_frames=self.num_frames,
            random_crop=name == "train",
            on_bad_sample=self.on_bad_sample,
            resample_audio=self.resample_audio,
            keep_decoded=self.keep_decoded,
            seed=self.seed,
            # Training reads only the run's fields; evaluation splits also give the pose their metrics read
            # (sync_pose_box, head_offset) wherever every row has it.
            fields=self.fields if name == "train" else None,
            max_frames=self.max_frames,
            max_frame_pixels=self.max_frame_pixels,
        )

    def _training_sampler(self, name: str, dataset: Dataset, batch_size: int) -> EpochSampler:
        """The training order, refused when this process's share of the rows makes not one whole batch (a fit would
        otherwise end at once, trained on nothing, as a success)."""
        sampler = EpochSampler(dataset, batch_size, seed=self.seed)
        if len(sampler) < batch_size:
            held_out = self.latent_cache_of(name) is None and self.sources["val"] is None and self.val_fraction > 0
            raise DataError(
                f"data.{name} has {len(dataset)} usable rows"
                + (f" (once data.val_fraction {self.val_fraction} is held out for validation)" if held_out else "")
                + (f", {len(sampler)} per process over {sampler.num_replicas}" if sampler.num_replicas > 1 else "")
                + f", fewer than data.batch_size {batch_size}: not one training batch (batches drop the last "
                "partial batch)",
                path=self.source(name),
            )
        return sampler

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before the sanity check's validation, which may take minutes
            self._training_sampler("train", self.dataset("train"), self.batch_size)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        dataset = self.dataset(name)
        batch_size = self.batch_size if name == "train" else self.eval_batch_size
        sampler = None
        if shuffle:
            sampler = self._training_sampler(name, dataset, batch_size)
            sampler.resume_at = self._resume_at
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=functools.partial(collate_clips, on_bad_sample=self.on_bad_sample),
            # Its own generator: creating an iterator then draws nothing from the global one (exact resumes).
            generator=torch.Generator().manual_seed(self.seed),
        )

    # --- the data position, for exact resumes ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Where training is in its data: the epoch and the batches of it already trained on (saved in
        checkpoints; a resumed run starts at the next batch of the same order)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume_at = (int(state["epoch"]), int(state["batches"]))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    # --- a fit that trained nothing is an error -----------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Count the fit's training batches with and without samples (``on_bad_sample: skip`` may drop all of a
        batch's): a whole epoch without one, or a fit without one, is an error (:meth:`_fail_if_nothing_trained`)."""
        trainer = self.trainer
        if trainer is not None and trainer.training and isinstance(batch, dict):
            if trainer.current_epoch != self._counted_epoch:
                self._fail_if_nothing_trained()  # a whole epoch has ended
                self._counted_epoch = trainer.current_epoch
            self._train_batches["empty" if batch.get("size", 1) == 0 else "kept"] += 1
        return batch

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self._counted_epoch is not None:
            try:
                self._fail_if_nothing_trained()
            finally:
                self._counted_epoch, self._train_batches = None, Counter()

    def _fail_if_nothing_trained(self) -> None:
        """Raise when every training batch so far lost all its samples. Lightning still counts an optimizer step
        for each (the step has no gradient), so such a fit would reach ``max_steps`` and end as a success having
        trained on nothing."""
        counts = self._train_batches
        if counts["empty"] and not counts["kept"]:
            raise DataError(
                f"nothing was trained: every sample of the {counts['empty']} training batches of this fit was "
                "skipped (data.on_bad_sample: skip; the warnings above say why)",
                path=self.source("train"),
            )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
