"""Fuzzing the data loader: ~270 seeded corruptions of one valid TalkingShapes clip and of its manifest.

Each case must load (the damage was harmless: the tensors are finite and well shaped) or end in a ``DataError``
naming the broken file and its field; with ``on_bad_sample="skip"`` the same row must be counted as skipped, never
raise. Manifest-level errors raise when the manifest is read, in both modes: a whole manifest cannot be skipped.
No case may hang.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Callable, Optional

import av
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
HEADER_BYTES = {"video": 1600, "rejected": 1600, "audio": 44, "reference": 33, "pose": 128}
"""Where each format keeps its header: the mp4's moov box (written first), the wav's fmt chunk, the png's IHDR, the
npy's dict. Flips there change how the rest is read; flips after it only change samples or pixels."""

LOADED, MANIFEST_ERROR = "loaded", "manifest error"


def _data_error(field: str) -> str:
    return f"DataError ({field})"


@dataclass
class Case:
    """One corruption. A media case breaks the file of ``field``: ``write(path)`` makes it, ``row`` edits the rest of
    the row. A manifest case (no ``field``) writes a whole manifest: ``manifest(folder, clean_row) -> path``."""

    name: str
    field: Optional[str] = None
    write: Optional[Callable[[Path], None]] = None
    suffix: Optional[str] = None
    row: Optional[Callable[[dict], dict]] = None
    manifest: Optional[Callable[[Path, dict], Path]] = None
    also: tuple[str, ...] = ()
    """Fields an error may name besides ``field``: audio read from the video's own track names the video file."""
    expect: Optional[str] = None
    """The outcome, where it does not depend on how a decoder copes with damage."""


# --- bytes and files --------------------------------------------------------------------------------------------


def _wav(samples: np.ndarray, rate: int, encoding: str = "pcm16", channels: int = 1) -> bytes:
    """A RIFF wav in any encoding, rate and channel count, written by hand so that what the writers refuse
    (NaN, 4 Hz, 0 channels) gets in. ``samples`` are interleaved."""
    samples = np.asarray(samples, dtype=np.float64)
    data = {
        "pcm16": lambda: np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes(),
        "pcm8": lambda: (np.round(np.clip(samples, -1, 1) * 127) + 128).astype(np.uint8).tobytes(),
        "float32": lambda: samples.astype("<f4").tobytes(),
        "float64": lambda: samples.astype("<f8").tobytes(),
    }[encoding]()
    tag, width = {"pcm16": (1, 2), "pcm8": (1, 1), "float32": (3, 4), "float64": (3, 8)}[encoding]
    fmt = np.array([tag, channels], "<u2").tobytes() + np.array([rate, rate * width * channels], "<u4").tobytes()
    fmt += np.array([width * channels, width * 8], "<u2").tobytes()
    chunks = b"WAVEfmt " + np.uint32(len(fmt)).tobytes() + fmt + b"data" + np.uint32(len(data)).tobytes() + data
    return b"RIFF" + np.uint32(len(chunks)).tobytes() + chunks


def _tone(seconds: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * 220.0 * np.arange(int(seconds * rate)) / rate)


def _frames(num_frames: int, size: int = SIZE) -> np.ndarray:
    grid = np.add.outer(np.arange(size), np.arange(size)) * 4
    return np.stack([np.stack([grid + t * 9, grid, 255 - grid], -1) for t in range(num_frames)]).astype(np.uint8)


def _image_bytes(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def _png_claiming(image: Image.Image, width: int, height: int) -> bytes:
    """A png whose IHDR (bytes 16-29, CRC after) claims another size, with a CRC that matches the lie."""
    data = bytearray(_image_bytes(image))
    data[16:24] = np.array([width, height], ">u4").tobytes()
    data[29:33] = np.uint32(zlib.crc32(bytes(data[12:29]))).byteswap().tobytes()
    return bytes(data)


def _tiff_with_rational_offsets(image: Image.Image) -> bytes:
    """A little-endian tiff whose StripOffsets tag is typed RATIONAL: PIL then raises TypeError, not OSError."""
    data = bytearray(_image_bytes(image, "TIFF"))
    ifd = int(np.frombuffer(data[4:8], "<u4")[0])
    for entry in range(int(np.frombuffer(data[ifd : ifd + 2], "<u2")[0])):
        at = ifd + 2 + 12 * entry
        if np.frombuffer(data[at : at + 2], "<u2")[0] == 273:  # StripOffsets
            data[at + 2 : at + 4] = np.uint16(5).tobytes()
    return bytes(data)


def _npy_bytes(array) -> bytes:
    buffer = BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


def _ts_bytes(size: int, num_frames: int) -> bytes:
    """An MPEG-TS stream: two of them, concatenated, are one stream whose frame size changes."""
    buffer = BytesIO()
    with av.open(buffer, "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
        for index, image in enumerate(_frames(num_frames, size)):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def _write_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


def _write_video(num_frames: int, fps: float = FPS, size: int = SIZE, audio: bool = True) -> Callable[[Path], None]:
    track = _tone(num_frames / fps, RATE) if audio else None
    return lambda path: media.write_video(path, _frames(num_frames, size), fps, track, RATE)


def _fifo(path: Path) -> None:
    os.mkfifo(path)  # opening it for reading blocks until someone writes


def _unreadable(data: bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        path.write_bytes(data)
        path.chmod(0)

    return write


# --- the cases ----------------------------------------------------------------------------------------------------


def _byte_cases(field: str, clean: bytes, others: dict[str, bytes], rng: np.random.Generator) -> list[Case]:
    """Damage to the file itself, whatever its format: cuts, flipped and overwritten bytes, files of other kinds."""
    cases = []

    def add(kind: str, write: Callable[[Path], None], expect: Optional[str] = None) -> None:
        cases.append(Case(f"{field}: {kind}", field, write, expect=expect))

    for fraction in sorted(rng.uniform(0.02, 0.98, 4)):
        cut = int(len(clean) * fraction)
        add(f"truncated at {cut} of {len(clean)} bytes", _write_bytes(clean[:cut]))
    header = HEADER_BYTES[field]
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
    broken = _data_error(field)
    add("empty file", _write_bytes(b""), broken)
    add("random garbage", _write_bytes(rng.bytes(int(rng.integers(1, 20000)))), broken)
    for kind in rng.choice(sorted(others), 2, replace=False):
        add(f"a {kind} file under the name", _write_bytes(others[kind]), broken)
    add("a directory", lambda path: path.mkdir(), broken)
    add("missing", lambda path: None, broken)
    add("a fifo", _fifo, broken)
    if os.geteuid() != 0:  # root reads anything
        add("unreadable (mode 000)", _unreadable(clean), broken)
    return cases


def _audio_cases() -> list[Case]:
    tone = _tone(NUM_FRAMES / FPS, RATE)
    with_nan = np.where(np.arange(len(tone)) == 7, np.nan, tone)
    with_inf = np.where(np.arange(len(tone)) == 9, np.inf, tone)
    cases = {
        "silent": (_wav(np.zeros(SAMPLES), RATE), "audio"),
        "0.1 s for a 0.36 s video": (_wav(tone[:1600], RATE), "audio"),
        "one sample": (_wav(tone[100:101], RATE), "audio"),
        "a header without samples": (_wav(np.zeros(0), RATE), "audio"),
        "4 kHz": (_wav(_tone(0.4, 4000), 4000), "audio"),
        "1 Hz": (_wav(tone, 1), "audio"),
        "0 Hz": (_wav(tone, 0), "audio"),
        "2^31-1 Hz": (_wav(tone, 2**31 - 1), "audio"),
        "0 channels": (_wav(tone, RATE, channels=0), "audio"),
        "17 channels": (_wav(np.repeat(tone, 17), RATE, channels=17), LOADED),  # more than 8 crashed PyAV
        "8 kHz (resampled)": (_wav(_tone(0.4, 8000), 8000), LOADED),
        "44.1 kHz stereo (resampled)": (_wav(np.repeat(_tone(0.4, 44100), 2), 44100, channels=2), LOADED),
        "8-bit": (_wav(tone, RATE, "pcm8"), LOADED),
        "float64": (_wav(tone, RATE, "float64"), LOADED),
        "float with a NaN": (_wav(with_nan, RATE, "float32"), "audio"),
        "float with an inf": (_wav(with_inf, RATE, "float32"), "audio"),
        "float, all NaN": (_wav(np.full(SAMPLES, np.nan), RATE, "float32"), "audio"),
        "float at 1e30": (_wav(tone * 1e30, RATE, "float32"), "audio"),
    }
    return [
        Case(f"audio: {kind}", "audio", _write_bytes(data), expect=_data_error(e) if e == "audio" else e)
        for kind, (data, e) in cases.items()
    ]


def _video_cases(clean_video: bytes) -> list[Case]:
    own_track = _drop("audio", "pose", "rejected")  # a clip whose only audio is the video's own track
    tagged = clean_video.replace(b"VideoHandler", b"Vid\xe9oHandler", 1)  # Latin-1, as old encoders write
    assert tagged != clean_video
    tone = _tone(NUM_FRAMES / FPS, RATE)
    return [
        Case(
            "audio: an mp4 without an audio track",
            "audio",
            _write_video(NUM_FRAMES, audio=False),
            ".mp4",
            expect=_data_error("audio"),
        ),
        Case("video: 5 frames, 9 needed", "video", _write_video(5), expect=_data_error("video")),
        Case("video: 1 frame", "video", _write_video(1), expect=_data_error("video")),
        Case("video: 30 fps", "video", _write_video(NUM_FRAMES, fps=30), expect=_data_error("video")),
        Case("video: 12.5 fps", "video", _write_video(NUM_FRAMES, fps=12.5), expect=_data_error("video")),
        Case(
            "video: 17 frames and their audio track (cropped)",
            "video",
            _write_video(17),
            row=own_track,
            also=("audio",),
            expect=LOADED,
        ),
        Case(
            "video: no audio track, no audio column",
            "video",
            _write_video(NUM_FRAMES, audio=False),
            row=own_track,
            also=("audio",),
            expect=_data_error("audio"),
        ),
        Case("video: a tag that is not UTF-8", "video", _write_bytes(tagged), expect=LOADED),
        Case(
            "video: an MPEG-TS whose frame size changes",
            "video",
            _write_bytes(_ts_bytes(32, 5) + _ts_bytes(16, 5)),
            ".ts",
            expect=_data_error("video"),
        ),
        Case("rejected: 16x16", "rejected", _write_video(NUM_FRAMES, size=16), expect=_data_error("rejected")),
        Case("rejected: 64x64", "rejected", _write_video(NUM_FRAMES, size=64), expect=_data_error("rejected")),
        Case("rejected: 17 frames", "rejected", _write_video(17), expect=_data_error("rejected")),
        Case("rejected: 30 fps", "rejected", _write_video(NUM_FRAMES, fps=30), expect=_data_error("rejected")),
        Case("rejected: a wav", "rejected", _write_bytes(_wav(tone, RATE)), ".wav", expect=_data_error("rejected")),
    ]


def _reference_cases() -> list[Case]:
    rgb = Image.fromarray(_frames(1)[0])
    grey = np.asarray(rgb.convert("L"))
    images = {
        "16x16": (_image_bytes(rgb.resize((16, 16))), "reference"),
        "1x1": (_image_bytes(rgb.resize((1, 1))), "reference"),
        "64x32": (_image_bytes(rgb.resize((64, 32))), "reference"),
        "a header claiming 60000x60000 (decompression bomb)": (_png_claiming(rgb, 60000, 60000), "reference"),
        "a header claiming 0x0": (_png_claiming(rgb, 0, 0), "reference"),
        "a tiff with RATIONAL strip offsets": (_tiff_with_rational_offsets(rgb), "reference"),
        "greyscale (expanded)": (_image_bytes(rgb.convert("L")), LOADED),
        "RGBA (alpha dropped)": (_image_bytes(rgb.convert("RGBA")), LOADED),
        "palette": (_image_bytes(rgb.convert("P")), LOADED),
        "1-bit": (_image_bytes(rgb.convert("1")), LOADED),
        "16-bit greyscale": (_image_bytes(Image.fromarray(grey.astype(np.uint16) * 257)), LOADED),
        "float32 tiff": (_image_bytes(Image.fromarray(grey.astype(np.float32)), "TIFF"), LOADED),
        "jpeg under a png name": (_image_bytes(rgb, "JPEG"), LOADED),
        "CMYK jpeg": (_image_bytes(rgb.convert("CMYK"), "JPEG"), LOADED),
        "gif": (_image_bytes(rgb, "GIF"), LOADED),
    }
    return [
        Case(f"reference: {kind}", "reference", _write_bytes(data), expect=_data_error(e) if e == "reference" else e)
        for kind, (data, e) in images.items()
    ]


def _pose_cases() -> list[Case]:
    pose = np.random.default_rng(SEED).uniform(0, 1, (NUM_FRAMES, 8, 2)).astype(np.float32)
    one_bad = np.arange(pose.size).reshape(pose.shape) == 5
    with np.errstate(over="ignore"):
        overflowing = np.full(pose.shape, 1e30).astype(np.float16)
    arrays = {
        "NaN": np.where(one_bad, np.nan, pose),
        "inf": np.where(one_bad, -np.inf, pose),
        "[T, K] (no xy axis)": pose[..., 0],
        "[T, K, 3]": np.concatenate([pose, pose[..., :1]], -1),
        "[T, K, 2, 1]": pose[..., None],
        "5 frames for 9": pose[:5],
        "17 frames for 9": np.concatenate([pose, pose])[:17],
        "0 keypoints": pose[:, :0],
        "a scalar": np.float32(3.0),
        "empty": np.zeros((0,), np.float32),
        "an object array (pickled)": np.array([[[0.1, 0.2]] * 8] * NUM_FRAMES, dtype=object),
        "a ragged object array (pickled)": np.array([np.zeros((8, 2)), np.zeros((7, 2))] + [None] * 7, dtype=object),
        "strings": pose.astype("U8"),
        "bytes": pose.astype("S3"),
        "complex": pose.astype(np.complex64),
        "structured": np.zeros((NUM_FRAMES, 8), dtype=[("x", "f4"), ("y", "f4")]),
        "datetimes": np.zeros((NUM_FRAMES, 8, 2), dtype="datetime64[s]"),
        "bools": pose > 0.5,
        "float16 overflowing to inf": overflowing,
    }
    castable = {"float64 (cast)": pose.astype(np.float64), "int (cast)": (pose > 0.5).astype(np.int64)}
    npz = BytesIO()
    np.savez(npz, pose=pose)
    texts = {
        "invalid": b"[[[0.1, 0.2], [0.3",
        "a dict": b'{"keypoints": [[0.1, 0.2]]}',
        "ragged lists": json.dumps([[[0.1, 0.2]] * 8] * 8 + [[[0.1, 0.2]] * 7]).encode(),
        "strings": json.dumps([[["a", "b"]] * 8] * NUM_FRAMES).encode(),
        "nulls": json.dumps([[[None, 0.2]] * 8] * NUM_FRAMES).encode(),
        "objects in lists": json.dumps([[{"x": 0.1, "y": 0.2}] * 8] * NUM_FRAMES).encode(),
        "a NaN literal": json.dumps([[[float("nan"), 0.2]] * 8] * NUM_FRAMES).encode(),
        "1e400": json.dumps([[[0.5, 0.2]] * 8] * NUM_FRAMES).replace("0.5", "1e400").encode(),
        "a 400-digit integer": json.dumps([[[10**400, 0]] * 8] * NUM_FRAMES).encode(),
        "an empty list": b"[]",
        "a number": b"3",
        "Latin-1 bytes": '["\xe9"]'.encode("latin-1"),
    }
    error = _data_error("pose")
    cases = [
        Case(f"pose: {kind}", "pose", _write_bytes(_npy_bytes(array)), expect=error) for kind, array in arrays.items()
    ]
    cases += [Case(f"pose: {kind}", "pose", _write_bytes(_npy_bytes(a)), expect=LOADED) for kind, a in castable.items()]
    cases += [
        Case("pose: an npz under an npy name", "pose", _write_bytes(npz.getvalue()), expect=error),
        Case("pose: a pickle under an npy name", "pose", _write_bytes(pickle.dumps(pose)), expect=error),
        Case("pose: json, valid", "pose", _write_bytes(json.dumps(pose.tolist()).encode()), ".json", expect=LOADED),
        Case("pose: a .txt file", "pose", _write_bytes(b"0.1 0.2\n"), ".txt", expect=error),
        Case("pose: no extension", "pose", _write_bytes(_npy_bytes(pose)), "", expect=error),
    ]
    cases += [
        Case(f"pose: json, {kind}", "pose", _write_bytes(text), ".json", expect=error) for kind, text in texts.items()
    ]
    return cases


def _no_video(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("video", "pose", "rejected")}


def _drop(*keys: str) -> Callable[[dict], dict]:
    return lambda row: {k: v for k, v in row.items() if k not in keys}


def _set(**values) -> Callable[[dict], dict]:
    return lambda row: {**row, **values}


def _write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _text(name: str, text: str | bytes | Callable[[dict], str]) -> Callable[[Path, dict], Path]:
    """A manifest with this content; a function of the clean row makes it from that row."""

    def make(folder: Path, row: dict) -> Path:
        content = text(row) if callable(text) else text
        (folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        return folder / name

    return make


def _rows(*edits: Callable[[dict], dict]) -> Callable[[Path, dict], Path]:
    """A jsonl manifest of one row per edit of the clean row."""
    return lambda folder, row: _write_rows(folder / "m.jsonl", [edit(dict(row)) for edit in edits])


def _csv(edit: Callable[[dict], dict]) -> Callable[[Path, dict], Path]:
    def make(folder: Path, row: dict) -> Path:
        row = edit(row)
        (folder / "m.csv").write_text(",".join(row) + "\n" + ",".join(str(v) for v in row.values()) + "\n")
        return folder / "m.csv"

    return make


def _parquet(table: Callable[[dict], pa.Table]) -> Callable[[Path, dict], Path]:
    def make(folder: Path, row: dict) -> Path:
        pq.write_table(table(row), folder / "m.parquet")
        return folder / "m.parquet"

    return make


def _symlink_loop(folder: Path, row: dict) -> Path:
    (folder / "loop.wav").symlink_to(folder / "loop.wav")
    return _write_rows(folder / "m.jsonl", [{**row, "audio": "loop.wav"}])


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _manifest_cases(rng: np.random.Generator) -> list[Case]:
    cases = []

    def add(name: str, make: Callable[[Path, dict], Path], expect: Optional[str] = MANIFEST_ERROR) -> None:
        cases.append(Case(f"manifest: {name}", manifest=make, expect=expect))

    def damage(kind: str, change: Callable[[bytes], bytes], expect: Optional[str] = None) -> None:
        def make(folder: Path, row: dict) -> Path:
            path = _write_rows(folder / "m.jsonl", [row, {**row, "id": "second"}])
            path.write_bytes(change(path.read_bytes()))
            return path

        add(kind, make, expect)

    for fraction in rng.uniform(0.05, 0.95, 5):
        damage(f"cut at {fraction:.0%}", lambda data, f=fraction: data[: int(len(data) * f)])
    for _ in range(8):
        where, bits = rng.integers(0, 400, int(rng.integers(1, 4))), rng.integers(0, 8, 3)

        def flip(data: bytes, where=where, bits=bits) -> bytes:
            data = bytearray(data)
            for index, bit in zip(where, bits):
                data[int(index) % len(data)] ^= 1 << int(bit)
            return bytes(data)

        damage(f"bits flipped at {sorted(where.tolist())}", flip)
    damage("a UTF-8 byte order mark", lambda data: b"\xef\xbb\xbf" + data, LOADED)
    damage("Latin-1 bytes", lambda data: data.replace(b"clip", b"cl\xe9p", 1), MANIFEST_ERROR)
    damage("NUL bytes", lambda data: data[:30] + b"\0\0\0" + data[30:], MANIFEST_ERROR)
    damage("blank lines", lambda data: b"\n\n" + data.replace(b"\n", b"\n\n"), LOADED)
    damage("CRLF line ends", lambda data: data.replace(b"\n", b"\r\n"), LOADED)
    for text in (
        '{"video": ',
        '{"video": "a.mp4"} trailing',
        "{'video': 'a.mp4'}",
        "[1, 2]",
        "null",
        '"a string"',
        "{}\n{}",
        "\0" * 64,
    ):
        add(f"the line {text[:24]!r}", _text("m.jsonl", text + "\n"))
    add("a good row, then a garbage line", _text("m.jsonl", lambda row: json.dumps(row) + "\n{oops\n"))

    for field in FIELDS:
        for value in rng.choice(np.array([7, 1.5, ["a.mp4"], {"path": "a.mp4"}, {}, True, ""], dtype=object), 4, False):
            add(f"{field} = {value!r}", _rows(_set(**{field: value})))
    add("video a string in one row, a number in the next", _rows(lambda row: row, _set(video=5)))
    add("no video (audio and reference: conditions to animate)", _rows(_no_video), LOADED)
    add("no video, no reference", _rows(_drop("video", "reference")))
    add("no video, no audio", _rows(_drop("video", "audio")))
    add("only an id", _rows(lambda row: {"id": "x"}))
    add("video and audio null", _rows(_set(video=None, audio=None)))
    add("empty file", _text("m.jsonl", ""))
    add("only newlines", _text("m.jsonl", "\n\n\n"))
    add("json: []", _text("m.json", "[]"))
    add("json: {}", _text("m.json", "{}"))
    add("json: 42", _text("m.json", "42"))
    add("json: an array of one row", _text("m.json", lambda row: json.dumps([row], indent=2)), LOADED)
    add("json: a pretty-printed row", _text("m.json", lambda row: json.dumps(row, indent=2)), LOADED)
    add("json: rows under a key", _text("m.json", lambda row: json.dumps({"rows": [row]})))
    add(
        "duplicate keys, the bad value last",
        _text("m.jsonl", lambda row: json.dumps(row)[:-1] + ', "video": "x.mp4"}'),
        None,
    )
    add(
        "duplicate keys, the good value last",
        _text("m.jsonl", lambda row: '{"video": "x.mp4", ' + json.dumps(row)[1:]),
        None,
    )
    add("csv: garbage", _text("m.csv", rng.bytes(3000)))
    add("csv: a header only", _text("m.csv", "id,video,audio\n"))
    add("csv: a row", _csv(lambda row: row), LOADED)
    add("csv: a number for video", _csv(_set(video=12)))
    add("csv: an empty audio cell (the video's track)", _csv(_set(audio="")), None)
    add("csv: ragged rows", _text("m.csv", 'video,audio\na.mp4,b.wav,c,d\n"unclosed\n'))
    add("parquet: garbage", _text("m.parquet", rng.bytes(3000)))
    add("parquet: a row", _parquet(lambda row: pa.Table.from_pylist([row])), LOADED)
    add("parquet: an integer for video", _parquet(lambda row: pa.Table.from_pylist([{**row, "video": 3}])))
    add("parquet: no columns", _parquet(lambda row: pa.table({})))
    add("parquet: a jsonl under the name", _text("m.parquet", json.dumps))
    add("unknown extension .txt", _text("m.txt", "video\n"))
    add("unknown extension .yaml", _text("m.yaml", "video: a.mp4\n"))
    add("no extension", _text("manifest", "{}\n"))
    add("missing", lambda folder, row: folder / "m.jsonl")
    add("a directory", lambda folder, row: _mkdir(folder / "m.jsonl"))
    add(
        "video escapes into a missing folder",
        _rows(_set(video="../../../../no/such/folder/a.mp4")),
        _data_error("video"),
    )
    add("audio at a missing absolute path", _rows(_set(audio="/no/such/folder/a.wav")), _data_error("audio"))
    add("video is a URL", _rows(_set(video="s3://bucket/a.mp4")), _data_error("video"))
    add("reference with a NUL byte", _rows(_set(reference="a\0.png")), _data_error("reference"))
    add("pose with a 300-character name", _rows(_set(pose="p" * 300 + ".npy")), _data_error("pose"))
    add("audio with a 300-character name", _rows(_set(audio="a" * 300 + ".wav")), _data_error("audio"))
    add("video is the manifest's folder", _rows(_set(video=".")), _data_error("video"))
    add("video is the manifest itself", _rows(_set(video="m.jsonl")), _data_error("video"))
    add("audio is a symlink loop", _symlink_loop, _data_error("audio"))
    add("unknown columns (kept)", _rows(_set(extra={"a": [1, 2]}, speaker=3)), LOADED)
    add("id an object", _rows(_set(id={"a": 1})), LOADED)
    return cases


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
    own = {"video": "mp4", "rejected": "mp4", "audio": "wav", "reference": "png", "pose": "npy"}
    cases = []
    for field in FIELDS:
        cases += _byte_cases(field, data[field], {k: v for k, v in others.items() if k != own[field]}, rng)
    # The video's own audio track, when the row gives no audio file.
    for case in _byte_cases("video", data["video"], others, rng)[:8]:
        case.name = case.name.replace("video:", "video (and its audio track):")
        case.row, case.also = _drop("audio"), ("audio",)
        cases.append(case)
    # Conditions to animate (no video): the audio's length sets the clip's.
    for case in (
        _byte_cases("audio", data["audio"], others, rng)[::3]
        + _byte_cases("reference", data["reference"], others, rng)[::4]
    ):
        case.name = case.name.replace(": ", " (no video): ", 1)
        case.row = _no_video
        cases.append(case)
    cases += _audio_cases() + _video_cases(data["video"]) + _reference_cases() + _pose_cases()
    return cases + _manifest_cases(rng)


# --- running a case ---------------------------------------------------------------------------------------------


def _in_thread(function: Callable[[], object]) -> tuple[object, Optional[BaseException], bool]:
    """``(result, error, hung)``. A daemon thread, not a pool: a decoder stuck in C cannot be interrupted, and only a
    daemon thread lets the test process end after reporting the hang."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:  # every error is judged by the caller
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(CASE_TIMEOUT_S)
    return outcome.get("result"), outcome.get("error"), thread.is_alive()


def _load(manifest: Path, on_bad_sample: str):
    """``(rows, first item, None)``, or ``(None, None, error)`` for a DataError from reading the manifest itself."""
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
    shapes = {"audio": (SAMPLES,), "video": (NUM_FRAMES, 3, SIZE, SIZE), "rejected": (NUM_FRAMES, 3, SIZE, SIZE)}
    shapes["reference"] = (3, SIZE, SIZE) if "video" in item else (3, *item["reference"].shape[1:])
    for key, shape in shapes.items():
        if key in item and tuple(item[key].shape) != shape:
            problems.append(f"{key} has shape {list(item[key].shape)}, expected {list(shape)}")
    if "video" not in item and item.get("num_frames") != NUM_FRAMES:
        problems.append(f"num_frames is {item.get('num_frames')}, expected {NUM_FRAMES}")
    for key in ("video", "reference", "rejected"):
        if key in item and (item[key].min() < 0 or item[key].max() > 1):
            problems.append(f"{key} is outside [0, 1]")
    if item["audio"].abs().max() > media.MAX_PEAK:
        problems.append(f"audio peaks at {item['audio'].abs().max():.3g}")
    if "pose" in item and (item["pose"].ndim != 3 or item["pose"].shape[0] != NUM_FRAMES or item["pose"].shape[2] != 2):
        problems.append(f"pose has shape {list(item['pose'].shape)}")
    return problems


def _error_problems(error: DataError, manifest: Path, bad: Optional[Path], case: Case) -> list[str]:
    """A DataError from a row must name a field of the row and the file that field points at (for a broken file:
    that file)."""
    if error.field not in FIELDS:
        return [f"names field {error.field!r}, not a media field: {error}"]
    problems = []
    if error.path is None or error.path not in str(error) or f"field '{error.field}'" not in str(error):
        problems.append(f"the message does not name the file and the field: {error}")
    parsed = PortraitDataModule(train=str(manifest), val_fraction=0.0).split("train")[0]
    row = parsed.rows[0]
    from_video = error.field == "audio" and not row.get("audio")
    source = row.get("video" if from_video else error.field)
    if not isinstance(source, str) or error.path != parsed.resolve(source):
        problems.append(f"names {error.path!r}, but the row's {error.field} is {source!r}: {error}")
    if bad is not None:
        if error.field not in (case.field, *case.also):
            problems.append(f"names field {error.field!r}, but {case.field!r} was broken: {error}")
        if Path(error.path).resolve() != bad.resolve():
            problems.append(f"names {error.path}, but {bad} was broken: {error}")
    return problems


def _run_case(case: Case, folder: Path, clean: dict[str, Path]) -> tuple[str, list[str]]:
    """The outcome and what went wrong."""
    folder.mkdir()
    row = {"id": "clip", **{field: str(path) for field, path in clean.items()}}
    bad = None
    if case.field is not None:
        bad = folder / f"bad{SUFFIX[case.field] if case.suffix is None else case.suffix}"
        case.write(bad)
        row[case.field] = bad.name  # relative: resolved against the manifest's folder
        manifest = _write_rows(folder / "m.jsonl", [case.row(row) if case.row else row])
    else:
        manifest = case.manifest(folder, row)

    result, error, hung = _in_thread(lambda: _load(manifest, "raise"))
    if hung:
        return "hang", [f"hung for {CASE_TIMEOUT_S:g} s with on_bad_sample='raise'"]
    _, item, manifest_error = result or (None, None, None)
    if manifest_error is not None:
        outcome, problems = MANIFEST_ERROR, []
        if manifest_error.path != str(manifest) or str(manifest) not in str(manifest_error):
            problems.append(f"a manifest error does not name the manifest: {manifest_error}")
    elif isinstance(error, DataError):
        outcome, problems = _data_error(error.field), _error_problems(error, manifest, bad, case)
    elif error is not None:
        return "other error", [f"{type(error).__name__} with on_bad_sample='raise': {error}"]
    else:
        outcome, problems = LOADED, _item_problems(item)
    if case.expect is not None and outcome != case.expect:
        problems.append(f"expected '{case.expect}', got '{outcome}': {manifest_error or error or 'no error'}")
    elif bad is not None and outcome == MANIFEST_ERROR:
        problems.append(f"a broken {case.field} file failed the whole manifest: {manifest_error}")

    result, error, hung = _in_thread(lambda: _load(manifest, "skip"))
    if hung:
        return outcome, problems + [f"hung for {CASE_TIMEOUT_S:g} s with on_bad_sample='skip'"]
    if error is not None:
        return outcome, problems + [f"{type(error).__name__} with on_bad_sample='skip': {error}"]
    _, item, manifest_error = result
    if (manifest_error is not None) != (outcome == MANIFEST_ERROR):
        problems.append(f"on_bad_sample='skip' gave manifest error {manifest_error} after '{outcome}'")
    elif manifest_error is None and collate_clips([item])["skipped"] != (outcome != LOADED):
        problems.append(f"on_bad_sample='skip' counted {collate_clips([item])['skipped']} skipped after '{outcome}'")
    return outcome, problems


@pytest.fixture(scope="module")
def clean_clip(tmp_path_factory) -> dict[str, Path]:
    """The files of one valid 9-frame 32x32 preference pair: video, audio, reference, pose and a rejected video."""
    out = tmp_path_factory.mktemp("fuzz_clean")
    cfg = TalkingShapesConfig(num_frames=NUM_FRAMES, size=SIZE, fps=FPS, sample_rate=RATE)
    manifest = write_dataset(out, num_clips=1, seed=SEED, cfg=cfg, rejected=("shift",))
    row = json.loads(manifest.read_text().splitlines()[0])
    return {field: out / row[field] for field in FIELDS}


def test_every_corruption_loads_or_is_a_data_error(clean_clip, tmp_path, monkeypatch) -> None:
    import datasets

    # Hundreds of one-off manifests: keep their Arrow caches out of the user's cache, and their progress bars quiet.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    bars_were_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    cases = _cases(clean_clip)
    assert len(cases) >= 200 and len({case.name for case in cases}) == len(cases)
    outcomes, failures, failed = Counter(), [], set()
    start = time.perf_counter()
    try:
        for index, case in enumerate(cases):
            outcome, problems = _run_case(case, tmp_path / f"case_{index:03d}", clean_clip)
            outcomes[outcome] += 1
            failures += [f"{case.name}: {problem}" for problem in problems]
            failed |= {case.name} if problems else set()
    finally:
        if not bars_were_off:
            datasets.enable_progress_bars()
    print(f"\nfuzzed the loader with {len(cases)} cases in {time.perf_counter() - start:.1f} s, by outcome:")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {count:4d}  {outcome}")
    assert not failures, f"{len(failed)} of {len(cases)} cases failed:\n" + "\n".join(failures)
