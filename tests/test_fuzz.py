"""Fuzzing the data loader: ~250 seeded corruptions of one valid TalkingShapes clip and of its manifest.

Each case must load (the damage was harmless, and the tensors are finite and well shaped) or end in a ``DataError``
naming the broken file and its field; with ``on_bad_sample="skip"`` the same row must be counted as skipped, never
raise. Manifest-level errors raise at load time in both modes (a whole manifest cannot be skipped). No case may hang.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from collections import Counter
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from prefalign.data import media
from prefalign.data.datamodule import PortraitDataModule, collate_clips
from prefalign.data.errors import DataError
from prefalign.data.synthetic import TalkingShapesConfig, write_dataset

SEED = 0
NUM_FRAMES = 9
SIZE = 32
FPS = 25
RATE = 16000
SAMPLES = NUM_FRAMES * RATE // FPS
CASE_TIMEOUT_S = 15.0
FIELDS = ("video", "audio", "reference", "pose", "rejected")
SUFFIX = {"video": ".mp4", "audio": ".wav", "reference": ".png", "pose": ".npy", "rejected": ".mp4"}


@dataclass
class Case:
    """One corruption. A media case breaks the file of ``field``: ``write(path)`` writes it, ``row`` edits the rest
    of the row. A manifest case (``field`` None) builds a whole manifest with ``manifest(folder, clean_row)``."""

    name: str
    field: Optional[str] = None
    write: Optional[Callable[[Path], None]] = None
    suffix: Optional[str] = None
    row: Optional[Callable[[dict], dict]] = None
    manifest: Optional[Callable[[Path, dict], Path]] = None
    fields: tuple[str, ...] = ()
    """Fields an error may name besides ``field``: audio read from the video's own track names the video file."""


# --- bytes and files --------------------------------------------------------------------------------------------


def _wav(samples: np.ndarray, rate: int, encoding: str = "pcm16", channels: int = 1) -> bytes:
    """A RIFF wav in any encoding and rate, written by hand so that values the writers refuse (NaN, 4 Hz) get in."""
    samples = np.asarray(samples, dtype=np.float64)
    data = {
        "pcm16": lambda: np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes(),
        "pcm8": lambda: (np.round(np.clip(samples, -1, 1) * 127) + 128).astype(np.uint8).tobytes(),
        "float32": lambda: samples.astype("<f4").tobytes(),
        "float64": lambda: samples.astype("<f8").tobytes(),
    }[encoding]()
    fmt, width = {"pcm16": (1, 2), "pcm8": (1, 1), "float32": (3, 4), "float64": (3, 8)}[encoding]
    header = np.array([fmt, channels], "<u2").tobytes() + np.array([rate, rate * width * channels], "<u4").tobytes()
    header += np.array([width * channels, width * 8], "<u2").tobytes()
    chunks = b"WAVE" + b"fmt " + np.uint32(len(header)).tobytes() + header
    chunks += b"data" + np.uint32(len(data)).tobytes() + data
    return b"RIFF" + np.uint32(len(chunks)).tobytes() + chunks


def _tone(seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * 220.0 * np.arange(int(seconds * rate)) / rate)


def _image_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def _npy_bytes(array) -> bytes:
    buffer = BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _frames(num_frames: int, size: int = SIZE) -> np.ndarray:
    grid = np.add.outer(np.arange(size), np.arange(size)) * 4
    return np.stack([np.stack([grid + t * 9, grid, 255 - grid], -1) for t in range(num_frames)]).astype(np.uint8)


def _write_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _write_video(num_frames: int, fps: float = FPS, size: int = SIZE, audio: bool = True) -> Callable[[Path], None]:
    track = _tone(num_frames / fps, RATE) if audio else None
    return lambda path: media.write_video(path, _frames(num_frames, size), fps, track, RATE)


def _fifo(path: Path) -> None:
    os.mkfifo(path)  # opening it for reading would block until someone writes


def _unreadable(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data)
        path.chmod(0)

    return write


# --- the cases ----------------------------------------------------------------------------------------------------


def _byte_cases(field: str, clean: bytes, others: dict[str, bytes], rng: np.random.Generator) -> list[Case]:
    """Damage of the file itself, whatever its format: cuts, flipped and overwritten bytes, wrong files."""
    cases = []

    def add(kind: str, write: Callable[[Path], None]) -> None:
        cases.append(Case(f"{field}: {kind}", field, write))

    for fraction in sorted(rng.uniform(0.02, 0.98, 4)):
        cut = int(len(clean) * fraction)
        add(f"truncated at {cut} of {len(clean)} bytes", _write_bytes(clean[:cut]))
    header = min(len(clean) // 4, 512)
    for region, low, high in (("header", 0, header), ("body", header, len(clean))):
        for _ in range(3):
            data = bytearray(clean)
            where = rng.integers(low, high, int(rng.integers(1, 9)))
            for index in where:
                data[index] ^= 1 << int(rng.integers(0, 8))
            add(f"{len(where)} bits flipped in the {region} at {sorted(where.tolist())}", _write_bytes(bytes(data)))
    for _ in range(2):
        start, length = int(rng.integers(0, len(clean))), int(rng.integers(16, 256))
        data = clean[:start] + rng.bytes(length) + clean[start + length :]
        add(f"{length} random bytes written at {start}", _write_bytes(data[: len(clean)]))
    add("empty file", _write_bytes(b""))
    add("random garbage", _write_bytes(rng.bytes(int(rng.integers(1, 20000)))))
    for kind in rng.choice(sorted(others), 2, replace=False):
        add(f"a {kind} file under the name", _write_bytes(others[kind]))
    add("a directory", lambda path: path.mkdir())
    add("missing", lambda path: None)
    add("a fifo", _fifo)
    if os.geteuid() != 0:  # root reads anything
        add("unreadable (mode 000)", _unreadable(clean))
    return cases


def _semantic_cases() -> list[Case]:
    """Files that decode but do not fit: wrong rates, lengths, sizes, values and shapes."""
    tone = _tone(NUM_FRAMES / FPS, RATE)
    cases = [
        Case("audio: silent", "audio", _write_bytes(_wav(np.zeros(SAMPLES), RATE))),
        Case("audio: 0.1 s for a 0.36 s video", "audio", _write_bytes(_wav(tone[:1600], RATE))),
        Case("audio: one sample", "audio", _write_bytes(_wav(tone[100:101], RATE))),
        Case("audio: header without samples", "audio", _write_bytes(_wav(np.zeros(0), RATE))),
        Case("audio: 4 kHz", "audio", _write_bytes(_wav(_tone(0.4, 4000), 4000))),
        Case("audio: 1 Hz", "audio", _write_bytes(_wav(tone, 1))),
        Case("audio: 0 Hz", "audio", _write_bytes(_wav(tone, 0))),
        Case("audio: 2^31-1 Hz", "audio", _write_bytes(_wav(tone, 2**31 - 1))),
        Case("audio: 8 kHz (resampled)", "audio", _write_bytes(_wav(_tone(0.4, 8000), 8000))),
        Case("audio: 44.1 kHz stereo (resampled)", "audio", _write_bytes(_wav(np.repeat(_tone(0.4, 44100), 2), 44100, channels=2))),
        Case("audio: 8-bit", "audio", _write_bytes(_wav(tone, RATE, "pcm8"))),
        Case("audio: float64", "audio", _write_bytes(_wav(tone, RATE, "float64"))),
        Case("audio: float with NaN", "audio", _write_bytes(_wav(np.where(np.arange(len(tone)) == 7, np.nan, tone), RATE, "float32"))),
        Case("audio: float with inf", "audio", _write_bytes(_wav(np.where(np.arange(len(tone)) == 9, np.inf, tone), RATE, "float32"))),
        Case("audio: all NaN", "audio", _write_bytes(_wav(np.full(SAMPLES, np.nan), RATE, "float32"))),
        Case("audio: float at 1e30", "audio", _write_bytes(_wav(tone * 1e30, RATE, "float32"))),
        Case("audio: an mp4 without an audio track", "audio", _write_video(NUM_FRAMES, audio=False), ".mp4"),
        Case("video: 5 frames, 9 needed", "video", _write_video(5)),
        Case("video: 1 frame", "video", _write_video(1)),
        Case("video: 30 fps", "video", _write_video(NUM_FRAMES, fps=30)),
        Case("video: 12.5 fps", "video", _write_video(NUM_FRAMES, fps=12.5)),
        Case("video: 17 frames, its own audio track (cropped)", "video", _write_video(17), row=_drop("audio", "pose", "rejected"),
             fields=("audio",)),
        Case("video: no audio track, no audio column", "video", _write_video(NUM_FRAMES, audio=False),
             row=lambda row: {k: v for k, v in row.items() if k != "audio"}, fields=("audio",)),
        Case("rejected: 16x16", "rejected", _write_video(NUM_FRAMES, size=16)),
        Case("rejected: 64x64", "rejected", _write_video(NUM_FRAMES, size=64)),
        Case("rejected: 17 frames", "rejected", _write_video(17)),
        Case("rejected: 30 fps", "rejected", _write_video(NUM_FRAMES, fps=30)),
        Case("rejected: a wav", "rejected", _write_bytes(_wav(tone, RATE)), ".wav"),
    ]
    rgb = Image.fromarray(_frames(1)[0])
    images = {
        "16x16": (rgb.resize((16, 16)), "PNG"),
        "1x1": (rgb.resize((1, 1)), "PNG"),
        "64x32": (rgb.resize((64, 32)), "PNG"),
        "greyscale (expanded)": (rgb.convert("L"), "PNG"),
        "RGBA (alpha dropped)": (rgb.convert("RGBA"), "PNG"),
        "palette": (rgb.convert("P"), "PNG"),
        "1-bit": (rgb.convert("1"), "PNG"),
        "16-bit greyscale": (Image.fromarray((np.asarray(rgb.convert("L")).astype(np.uint16) * 257)), "PNG"),
        "float32": (Image.fromarray(np.asarray(rgb.convert("L")).astype(np.float32)), "TIFF"),
        "jpeg under a png name": (rgb, "JPEG"),
        "CMYK jpeg": (rgb.convert("CMYK"), "JPEG"),
        "gif": (rgb, "GIF"),
    }
    for kind, (image, format) in images.items():
        cases.append(Case(f"reference: {kind}", "reference", _write_bytes(_image_bytes(image, format))))
    bomb = bytearray(_image_bytes(rgb))
    bomb[16:24] = np.array([60000, 60000], ">u4").tobytes()  # IHDR width and height; the CRC no longer matches
    cases.append(Case("reference: header claims 60000x60000", "reference", _write_bytes(bytes(bomb))))

    pose = np.random.default_rng(SEED).uniform(0, 1, (NUM_FRAMES, 8, 2)).astype(np.float32)
    poses = {
        "NaN": np.where(np.arange(pose.size).reshape(pose.shape) == 5, np.nan, pose),
        "inf": np.where(np.arange(pose.size).reshape(pose.shape) == 5, -np.inf, pose),
        "[T, K] (no xy axis)": pose[..., 0],
        "[T, K, 3]": np.concatenate([pose, pose[..., :1]], -1),
        "[T, K, 2, 1]": pose[..., None],
        "5 frames for 9": pose[:5],
        "17 frames for 9": np.concatenate([pose, pose])[:17],
        "0 keypoints": pose[:, :0],
        "a scalar": np.float32(3.0),
        "empty": np.zeros((0,), np.float32),
        "object array (pickled)": np.array([[[0.1, 0.2]] * 8] * NUM_FRAMES, dtype=object),
        "ragged object array (pickled)": np.array([np.zeros((8, 2)), np.zeros((7, 2))] + [None] * 7, dtype=object),
        "strings": pose.astype("U8"),
        "bytes": pose.astype("S3"),
        "complex": pose.astype(np.complex64),
        "structured": np.zeros((NUM_FRAMES, 8), dtype=[("x", "f4"), ("y", "f4")]),
        "datetimes": np.zeros((NUM_FRAMES, 8, 2), dtype="datetime64[s]"),
        "float64 (cast)": pose.astype(np.float64),
        "int (cast)": (pose > 0.5).astype(np.int64),
        "float16 overflowing": np.full(pose.shape, 1e30).astype(np.float16),
    }
    for kind, array in poses.items():
        cases.append(Case(f"pose: {kind}", "pose", _write_bytes(_npy_bytes(array))))
    npz = BytesIO()
    np.savez(npz, pose=pose)
    cases.append(Case("pose: an npz under an npy name", "pose", _write_bytes(npz.getvalue())))
    cases.append(Case("pose: a pickle under an npy name", "pose", _write_bytes(pickle.dumps(pose))))
    jsons = {
        "valid": json.dumps(pose.tolist()),
        "invalid": '[[[0.1, 0.2], [0.3',
        "a dict": '{"keypoints": [[0.1, 0.2]]}',
        "ragged lists": json.dumps([[[0.1, 0.2]] * 8] * 8 + [[[0.1, 0.2]] * 7]),
        "strings": json.dumps([[["a", "b"]] * 8] * NUM_FRAMES),
        "nulls": json.dumps([[[None, 0.2]] * 8] * NUM_FRAMES),
        "dicts in lists": json.dumps([[{"x": 0.1, "y": 0.2}] * 8] * NUM_FRAMES),
        "NaN literal": json.dumps([[[float("nan"), 0.2]] * 8] * NUM_FRAMES),
        "1e400": "[" + ",".join(["[" + ",".join(["[1e400, 0.2]"] * 8) + "]"] * NUM_FRAMES) + "]",
        "a 400-digit integer": json.dumps([[[10**400, 0]] * 8] * NUM_FRAMES),
        "empty list": "[]",
        "a number": "3",
        "latin-1 bytes": '["\xe9"]',
    }
    for kind, text in jsons.items():
        data = text.encode("latin-1") if kind == "latin-1 bytes" else text.encode()
        cases.append(Case(f"pose: json {kind}", "pose", _write_bytes(data), ".json"))
    cases.append(Case("pose: a .txt file", "pose", _write_bytes(b"0.1 0.2\n"), ".txt"))
    cases.append(Case("pose: no extension", "pose", _write_bytes(_npy_bytes(pose)), ""))
    return cases


def _no_video(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("video", "pose", "rejected")}


def _write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _text(name: str, text: str | bytes) -> Callable[[Path, dict], Path]:
    def make(folder: Path, row: dict) -> Path:
        path = folder / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    return make


def _rows(*edits: Callable[[dict], dict], name: str = "m.jsonl") -> Callable[[Path, dict], Path]:
    return lambda folder, row: _write_rows(folder / name, [edit(dict(row)) for edit in edits])


def _set(**values) -> Callable[[dict], dict]:
    return lambda row: {**row, **values}


def _drop(*keys: str) -> Callable[[dict], dict]:
    return lambda row: {k: v for k, v in row.items() if k not in keys}


def _parquet(table: Callable[[dict], pa.Table]) -> Callable[[Path, dict], Path]:
    def make(folder: Path, row: dict) -> Path:
        pq.write_table(table(row), folder / "m.parquet")
        return folder / "m.parquet"

    return make


def _csv(folder: Path, row: dict, edit: Callable[[dict], dict]) -> Path:
    row = edit(row)
    path = folder / "m.csv"
    path.write_text(",".join(row) + "\n" + ",".join(str(v) for v in row.values()) + "\n")
    return path


def _symlink_loop(folder: Path, row: dict) -> Path:
    (folder / "loop.wav").symlink_to(folder / "loop.wav")
    return _write_rows(folder / "m.jsonl", [{**row, "audio": "loop.wav"}])


def _manifest_cases(rng: np.random.Generator) -> list[Case]:
    cases = []

    def add(name: str, make: Callable[[Path, dict], Path]) -> None:
        cases.append(Case(f"manifest: {name}", manifest=make))

    def mutate(kind: str, change: Callable[[bytes], bytes]) -> None:
        def make(folder: Path, row: dict) -> Path:
            path = _write_rows(folder / "m.jsonl", [row, {**row, "id": "second"}])
            path.write_bytes(change(path.read_bytes()))
            return path

        add(kind, make)

    for fraction in rng.uniform(0.05, 0.95, 5):
        mutate(f"cut at {fraction:.0%}", lambda data, f=fraction: data[: int(len(data) * f)])
    for _ in range(8):
        where = rng.integers(0, 400, int(rng.integers(1, 4)))
        bits = rng.integers(0, 8, len(where))

        def flip(data: bytes, where=where, bits=bits) -> bytes:
            data = bytearray(data)
            for index, bit in zip(where, bits):
                data[int(index) % len(data)] ^= 1 << int(bit)
            return bytes(data)

        mutate(f"bits flipped at {sorted(where.tolist())}", flip)
    mutate("a UTF-8 byte order mark", lambda data: b"\xef\xbb\xbf" + data)
    mutate("latin-1 bytes", lambda data: data.replace(b"clip_", b"cl\xe9p_", 1))
    mutate("NUL bytes", lambda data: data[:30] + b"\0\0\0" + data[30:])
    mutate("blank lines (harmless)", lambda data: b"\n\n" + data.replace(b"\n", b"\n\n"))
    for text in ('{"video": ', '{"video": "a.mp4"} trailing', "{'video': 'a.mp4'}", "[1, 2]", "null",
                 '"a string"', "{}\n{}", "\0" * 64):
        add(f"line {text[:24]!r}", _text("m.jsonl", text + "\n"))
    add("a good row then a garbage line", lambda folder, row: _text("m.jsonl", json.dumps(row) + "\n{oops\n")(folder, row))

    for field in FIELDS:
        for value in (7, 1.5, ["clips/a.mp4"], {"path": "clips/a.mp4"}, {}, True, ""):
            add(f"{field} = {value!r}", _rows(_set(**{field: value})))
    add("video a string in one row, a number in the next", _rows(lambda r: r, _set(video=5)))
    add("video missing (audio and reference given: conditions)", _rows(_no_video))
    add("video and reference missing", _rows(_drop("video", "reference")))
    add("video and audio missing", _rows(_drop("video", "audio")))
    add("only an id", _rows(lambda row: {"id": "x"}))
    add("video null, audio null", _rows(_set(video=None, audio=None)))
    add("empty file", _text("m.jsonl", ""))
    add("only newlines", _text("m.jsonl", "\n\n\n"))
    add("json: []", _text("m.json", "[]"))
    add("json: {}", _text("m.json", "{}"))
    add("json: 42", _text("m.json", "42"))
    add("json: a row (valid)", lambda folder, row: _text("m.json", json.dumps([row]))(folder, row))
    add("json: a row of rows", lambda folder, row: _text("m.json", json.dumps({"rows": [row]}))(folder, row))
    add("json: duplicate key, the bad value last", lambda folder, row: _text(
        "m.jsonl", json.dumps(row)[:-1] + ', "video": "nowhere.mp4"}\n')(folder, row))
    add("json: duplicate key, the good value last", lambda folder, row: _text(
        "m.jsonl", '{"video": "nowhere.mp4", ' + json.dumps(row)[1:] + "\n")(folder, row))
    add("csv: garbage", _text("m.csv", rng.bytes(3000)))
    add("csv: header only", _text("m.csv", "id,video,audio\n"))
    add("csv: a row (valid)", lambda folder, row: _csv(folder, row, lambda r: r))
    add("csv: numbers for video", lambda folder, row: _csv(folder, row, _set(video=12)))
    add("csv: an empty audio cell", lambda folder, row: _csv(folder, row, _set(audio="")))
    add("csv: ragged rows", _text("m.csv", "video,audio\na.mp4,b.wav,c,d\n\"unclosed\n"))
    add("parquet: garbage", _text("m.parquet", rng.bytes(3000)))
    add("parquet: a row (valid)", _parquet(lambda row: pa.Table.from_pylist([row])))
    add("parquet: integers for video", _parquet(lambda row: pa.Table.from_pylist([{**row, "video": 3}])))
    add("parquet: no columns", _parquet(lambda row: pa.table({})))
    add("parquet: a jsonl under the name", lambda folder, row: _text("m.parquet", json.dumps(row))(folder, row))
    add("unknown extension .txt", _text("m.txt", "video\n"))
    add("unknown extension .yaml", _text("m.yaml", "video: a.mp4\n"))
    add("no extension", _text("manifest", "{}\n"))
    add("missing", lambda folder, row: folder / "m.jsonl")
    add("a directory", lambda folder, row: _mkdir(folder / "m.jsonl"))
    add("video escapes into a missing folder", _rows(_set(video="../../../../no/such/folder/a.mp4")))
    add("audio at a missing absolute path", _rows(_set(audio="/no/such/folder/a.wav")))
    add("video is a URL", _rows(_set(video="s3://bucket/a.mp4")))
    add("reference with a NUL byte", _rows(_set(reference="clips/a\0.png")))
    add("pose with a 300-character name", _rows(_set(pose="p" * 300 + ".npy")))
    add("audio with a 300-character name", _rows(_set(audio="a" * 300 + ".wav")))
    add("video is the manifest's folder", _rows(_set(video=".")))
    add("video is the manifest itself", _rows(_set(video="m.jsonl")))
    add("audio is a symlink loop", _symlink_loop)
    add("unknown columns (kept)", _rows(_set(extra={"a": [1, 2]}, speaker=3)))
    add("id a dict", _rows(_set(id={"a": 1})))
    return cases


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _cases(clean: dict[str, Path]) -> list[Case]:
    rng = np.random.default_rng(SEED)
    data = {field: clean[field].read_bytes() for field in FIELDS}
    others = {
        "mp4": data["video"],
        "wav": data["audio"],
        "png": data["reference"],
        "npy": data["pose"],
        "jpeg": _image_bytes(Image.open(clean["reference"]), "JPEG"),
        "json": b'{"video": "a.mp4"}',
    }
    cases = []
    for field in FIELDS:
        own = {"video": "mp4", "rejected": "mp4", "audio": "wav", "reference": "png", "pose": "npy"}[field]
        cases += _byte_cases(field, data[field], {k: v for k, v in others.items() if k != own}, rng)
    # The video's own audio track, when the row gives no audio file.
    for case in _byte_cases("video", data["video"], others, rng)[:8]:
        case.name = case.name.replace("video:", "video (and its audio track):")
        case.row, case.fields = _drop("audio"), ("audio",)
        cases.append(case)
    # Conditions to animate (no video): the audio's length sets the clip's.
    for case in _byte_cases("audio", data["audio"], others, rng)[::3] + _byte_cases("reference", data["reference"], others, rng)[::4]:
        case.name = case.name.replace(": ", " (no video): ", 1)
        case.row = _no_video
        cases.append(case)
    return cases + _semantic_cases() + _manifest_cases(rng)


# --- running a case ---------------------------------------------------------------------------------------------


def _in_thread(function: Callable[[], object]) -> tuple[object, Optional[BaseException], bool]:
    """``(result, error, hung)``. A daemon thread rather than a pool: a decoder stuck in C code cannot be
    interrupted, and a daemon thread at least does not keep the test process alive after the failure."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # noqa: BLE001 - every error is judged by the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(CASE_TIMEOUT_S)
    return outcome.get("result"), outcome.get("error"), thread.is_alive()


def _load(manifest: Path, on_bad_sample: str):
    """The manifest's rows and its first item, or a DataError from reading the manifest itself."""
    dm = PortraitDataModule(train=str(manifest), val_fraction=0.0, num_frames=NUM_FRAMES, on_bad_sample=on_bad_sample)
    try:
        parsed, _ = dm.split("train")
    except DataError as error:
        return None, None, error
    return parsed, dm.dataset("train")[0], None


def _item_problems(item: dict) -> list[str]:
    problems = []
    batch = collate_clips([item])
    if batch["skipped"] != 0 or batch["size"] != 1:
        problems.append(f"a good item counted as skipped={batch['skipped']}, size={batch['size']}")
    for key, value in item.items():
        if isinstance(value, torch.Tensor) and not torch.isfinite(value).all():
            problems.append(f"{key} is not finite")
    expected = {"audio": (SAMPLES,)}
    if "video" in item:
        expected.update(video=(NUM_FRAMES, 3, SIZE, SIZE), reference=(3, SIZE, SIZE))
        if "rejected" in item:
            expected["rejected"] = expected["video"]
    else:
        if item.get("num_frames") != NUM_FRAMES:
            problems.append(f"num_frames is {item.get('num_frames')}")
        if item["reference"].ndim != 3 or item["reference"].shape[0] != 3:
            problems.append(f"reference has shape {list(item['reference'].shape)}")
    for key, shape in expected.items():
        if tuple(item[key].shape) != shape:
            problems.append(f"{key} has shape {list(item[key].shape)}, expected {list(shape)}")
    for key in ("video", "reference", "rejected"):
        if key in item and (item[key].min() < 0 or item[key].max() > 1):
            problems.append(f"{key} is outside [0, 1]")
    if "pose" in item and (item["pose"].ndim != 3 or item["pose"].shape[0] != NUM_FRAMES or item["pose"].shape[2] != 2):
        problems.append(f"pose has shape {list(item['pose'].shape)}")
    return problems


def _error_problems(error: DataError, parsed, bad: Optional[Path], case: Case) -> list[str]:
    """A DataError from a row must name a field of the row and the file that field points at."""
    problems = []
    row = parsed.rows[0]
    if error.field not in FIELDS:
        return [f"names field {error.field!r}, not a media field: {error}"]
    if error.path is None or error.path not in str(error) or f"field '{error.field}'" not in str(error):
        problems.append(f"the message does not name the file and the field: {error}")
    via_video = error.field == "audio" and not row.get("audio") and row.get("video")
    source = row.get("video") if via_video else row.get(error.field)
    if not isinstance(source, str) or error.path != parsed.resolve(source):
        problems.append(f"names {error.path!r}, but the row's {error.field} is {source!r}: {error}")
    if bad is not None:
        if error.field not in (case.field, *case.fields):
            problems.append(f"names field {error.field!r}, but {case.field!r} was broken: {error}")
        if Path(error.path).resolve() != bad.resolve():
            problems.append(f"names {error.path}, but {bad} was broken: {error}")
    return problems


def _run_case(case: Case, folder: Path, clean: dict[str, Path]) -> tuple[str, list[str]]:
    """The outcome's label and what went wrong."""
    folder.mkdir()
    row = {"id": "clip", **{field: str(path) for field, path in clean.items()}}
    bad = None
    if case.field is not None:
        # Relative, so that the manifest's folder is resolved too.
        bad = folder / f"bad{SUFFIX[case.field] if case.suffix is None else case.suffix}"
        case.write(bad)
        row[case.field] = bad.name
        manifest = _write_rows(folder / "m.jsonl", [case.row(row) if case.row else row])
    else:
        manifest = case.manifest(folder, row)

    result, error, hung = _in_thread(lambda: _load(manifest, "raise"))
    if hung:
        return "hang", [f"hung for {CASE_TIMEOUT_S:g} s with on_bad_sample='raise'"]
    _, item, manifest_error = result or (None, None, None)
    if manifest_error is not None:
        problems = [] if manifest_error.path == str(manifest) else [f"a manifest error names {manifest_error.path}"]
        if str(manifest) not in str(manifest_error):
            problems.append(f"a manifest error does not name the manifest: {manifest_error}")
        if bad is not None:
            problems.append(f"a broken {case.field} file failed the whole manifest: {manifest_error}")
        outcome = "manifest error"
    elif isinstance(error, DataError):
        outcome = f"DataError ({error.field})"
        problems = _error_problems(error, _load_rows(manifest), bad, case)
    elif error is not None:
        return "other error", [f"{type(error).__name__} with on_bad_sample='raise': {error}"]
    else:
        outcome, problems = "loaded", _item_problems(item)

    result, skip_error, hung = _in_thread(lambda: _load(manifest, "skip"))
    if hung:
        return outcome, problems + [f"hung for {CASE_TIMEOUT_S:g} s with on_bad_sample='skip'"]
    if skip_error is not None:
        return outcome, problems + [f"{type(skip_error).__name__} with on_bad_sample='skip': {skip_error}"]
    _, skipped_item, skip_manifest_error = result
    if outcome == "manifest error":
        if skip_manifest_error is None:
            problems.append("the manifest failed with on_bad_sample='raise' but not with 'skip'")
    elif skip_manifest_error is not None:
        problems.append(f"on_bad_sample='skip' failed at the manifest: {skip_manifest_error}")
    else:
        skipped = collate_clips([skipped_item])["skipped"]
        if skipped != (outcome != "loaded"):
            problems.append(f"on_bad_sample='skip' counted {skipped} skipped after '{outcome}'")
    return outcome, problems


def _load_rows(manifest: Path):
    return PortraitDataModule(train=str(manifest), val_fraction=0.0).split("train")[0]


@pytest.fixture(scope="module")
def clean_clip(tmp_path_factory) -> dict[str, Path]:
    """The files of one valid 9-frame 32x32 clip, with a rejected clip: a preference pair."""
    out = tmp_path_factory.mktemp("fuzz_clean")
    manifest = write_dataset(out, num_clips=1, seed=SEED, cfg=TalkingShapesConfig(num_frames=NUM_FRAMES), rejected=("shift",))
    row = json.loads(manifest.read_text().splitlines()[0])
    return {field: out / row[field] for field in FIELDS}


def test_no_corruption_escapes_as_anything_but_a_data_error(clean_clip, tmp_path, monkeypatch) -> None:
    import datasets

    # Hundreds of one-off manifests: keep their Arrow caches out of the user's cache, and their progress bars quiet.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    cases = _cases(clean_clip)
    assert len(cases) >= 200 and len({case.name for case in cases}) == len(cases)
    outcomes, failures = Counter(), []
    start = time.perf_counter()
    try:
        for index, case in enumerate(cases):
            outcome, problems = _run_case(case, tmp_path / f"case_{index:03d}", clean_clip)
            outcomes[outcome] += 1
            failures += [f"{case.name}: {problem}" for problem in problems]
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    seconds = time.perf_counter() - start
    print(f"\nfuzzed the loader with {len(cases)} cases in {seconds:.1f} s:")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {count:4d}  {outcome}")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
