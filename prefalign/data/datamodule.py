"""PortraitDataModule: decodes manifest rows into clip tensors, with a train/val split and bad-sample handling."""

from __future__ import annotations

import json
import logging
import math
from typing import Literal, Optional

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from prefalign.data import media
from prefalign.data.errors import DataError
from prefalign.data.schema import Manifest, load_manifest

log = logging.getLogger(__name__)


def read_pose(path: str, field: str = "pose") -> np.ndarray:
    """Keypoints per frame ``[T, K, 2]`` (x, y in [0, 1]) from a .npy or .json file."""
    try:
        if path.endswith(".npy"):
            pose = np.load(path, allow_pickle=False)
        elif path.endswith(".json"):
            with open(path) as handle:
                pose = np.asarray(json.load(handle), dtype=np.float32)
        else:
            raise DataError("pose must be a .npy or .json file", path=path, field=field)
    except FileNotFoundError:
        raise DataError("file not found", path=path, field=field) from None
    except (ValueError, OSError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read keypoints ({error})", path=path, field=field) from None
    if pose.ndim != 3 or pose.shape[-1] != 2:
        raise DataError(f"expected keypoints of shape [frames, points, 2], got {list(pose.shape)}", path=path, field=field)
    pose = pose.astype(np.float32)
    if not np.isfinite(pose).all():
        raise DataError("keypoints contain NaN or infinity", path=path, field=field)
    return pose


class ClipDataset(Dataset):
    """Decodes one manifest row into ``id``, ``video [T,3,H,W]``, ``audio [S]``, ``reference [3,H,W]``, ``pose [T,K,2]``.

    Rows without a video (conditions for ``predict``) give ``audio``, ``reference`` and ``num_frames`` from
    the audio's duration. With ``on_bad_sample="skip"`` a bad row gives ``None`` (counted by the collate).
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
        cache: bool = False,
    ):
        self.manifest = manifest
        self.indices = indices
        self.sample_rate = sample_rate
        self.fps = fps
        self.num_frames = num_frames
        self.random_crop = random_crop
        self.on_bad_sample = on_bad_sample
        self.resample_audio = resample_audio
        # Decoded clips by row, when small enough to keep (each worker process keeps its own).
        self.cache: Optional[dict[int, dict]] = {} if cache else None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Optional[dict]:
        row = self.manifest.rows[self.indices[index]]
        try:
            return self.load(row, self.indices[index])
        except DataError as error:
            if self.on_bad_sample == "raise":
                raise
            log.warning("skipping a bad sample: %s", error)
            return None

    def load(self, row: dict, row_index: int) -> dict:
        if row.get("video") is None:
            return self._load_conditions(row, {"id": str(row.get("id", row_index))}, self.sample_rate / self.fps)
        clip = self.cache.get(row_index) if self.cache is not None else None
        if clip is None:
            clip = self.decode(row, row_index)
            if self.cache is not None:
                self.cache[row_index] = clip
        return self.crop(clip)

    def decode(self, row: dict, row_index: int) -> dict:
        """The whole clip of a row, checked: uint8 frames, audio covering them, reference, pose."""
        samples_per_frame = self.sample_rate / self.fps
        video_path = self.manifest.resolve(row["video"])
        frames, fps = media.read_video(video_path, field="video")
        if abs(fps - self.fps) > 0.01:
            raise DataError(f"video is {fps:g} fps, the data module expects {self.fps:g}", path=video_path, field="video")
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
        }
        if row.get("pose"):
            pose_path = self.manifest.resolve(row["pose"])
            pose = read_pose(pose_path)
            if pose.shape[0] != total:
                raise DataError(f"pose has {pose.shape[0]} frames, the video {total}", path=pose_path, field="pose")
            clip["pose"] = pose
        if row.get("rejected"):
            clip["rejected"] = self._rejected(self.manifest.resolve(row["rejected"]), frames.shape)
        if "labels" in row:
            clip["labels"] = row["labels"]
        return clip

    def _rejected(self, path: str, shape: tuple) -> np.ndarray:
        """The rejected clip of a preference pair: same length, size and rate as the chosen one."""
        frames, fps = media.read_video(path, field="rejected")
        if abs(fps - self.fps) > 0.01:
            raise DataError(f"video is {fps:g} fps, the data module expects {self.fps:g}", path=path, field="rejected")
        if frames.shape != shape:
            raise DataError(
                f"rejected clip is {list(frames.shape[:3])} (frames, height, width), the chosen one {list(shape[:3])}",
                path=path,
                field="rejected",
            )
        return frames

    def crop(self, clip: dict) -> dict:
        """``num_frames`` consecutive frames (random start when training) and the audio and pose that go with them."""
        total = clip["frames"].shape[0]
        length = self.num_frames or total
        start = int(torch.randint(0, total - length + 1, ()).item()) if self.random_crop else 0
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
        return item

    def _load_conditions(self, row: dict, item: dict, samples_per_frame: float) -> dict:
        audio_path = self.manifest.resolve(row["audio"])
        audio = media.read_audio(audio_path, self.sample_rate, resample=self.resample_audio, field="audio")
        available = int(audio.shape[0] // samples_per_frame)
        length = self.num_frames or available
        if available < length or length < 1:
            raise DataError(f"audio covers {available} frames, fewer than the {length} needed", path=audio_path, field="audio")
        item["num_frames"] = length
        item["audio"] = torch.from_numpy(audio[: round(length * samples_per_frame)].copy())
        item["reference"] = self._reference(row, None, None)
        return item

    def _reference(self, row: dict, first_frame: Optional[np.ndarray], size) -> torch.Tensor:
        if row.get("reference"):
            path = self.manifest.resolve(row["reference"])
            image = media.read_image(path, field="reference")
            if size is not None and tuple(image.shape[:2]) != tuple(size):
                raise DataError(
                    f"reference image is {image.shape[0]}x{image.shape[1]}, the video {size[0]}x{size[1]}",
                    path=path,
                    field="reference",
                )
        else:
            image = first_frame
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255


def collate_clips(items: list[Optional[dict]]) -> dict:
    """Stack clips into a batch; skipped (``None``) items are dropped and counted in ``batch["skipped"]``."""
    kept = [item for item in items if item is not None]
    batch: dict = {"skipped": len(items) - len(kept), "size": len(kept), "id": [item["id"] for item in kept]}
    if not kept:
        return batch
    for key in kept[0]:
        if key == "id":
            continue
        if any(key not in item for item in kept):
            raise DataError(f"some clips of this batch have '{key}' and some do not: give it for all rows", field=key)
        values = [item[key] for item in kept]
        if isinstance(values[0], torch.Tensor):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise DataError(
                    f"clips of one batch differ in shape {sorted(shapes)}: set data.num_frames, or batch_size 1",
                    field=key,
                )
            batch[key] = torch.stack(values)
        else:
            batch[key] = torch.as_tensor(values) if isinstance(values[0], (int, float)) else values
    return batch


class PortraitDataModule(L.LightningDataModule):
    """Clips for training, validation, testing and prediction, from manifests in the clip schema.

    Args:
        train (str | None): training manifest (jsonl, json, parquet, csv) or Hub dataset id.
        val (str | None): validation manifest; if not given, ``val_fraction`` of ``train`` is held out.
        test (str | None): held-out manifest for ``prefalign test``.
        predict (str | None): manifest of conditions to animate (``audio`` + ``reference``, or ``video``).
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
            ``skip`` drops it, logs why, and counts it (``train/skipped_samples``).
        seed (int): seed of the train/val split.
        cache_decoded (bool): keep decoded clips in memory after their first use (small datasets such as the
            demo's; at scale, decode in worker processes instead).
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
        cache_decoded: bool = False,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
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
        self.cache_decoded = cache_decoded
        self._manifests: dict[str, Manifest] = {}
        self._splits: dict[str, tuple[Manifest, list[int]]] = {}

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
        self._splits[name] = (manifest, indices)
        return self._splits[name]

    def source(self, name: str) -> str:
        return self.split(name)[0].source

    def available_fields(self, name: str) -> set[str]:
        return self.split(name)[0].fields()

    def dataset(self, name: str) -> ClipDataset:
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
            cache=self.cache_decoded,
        )

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(name),
            batch_size=self.batch_size if name == "train" else self.eval_batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_clips,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)
