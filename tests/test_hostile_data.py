"""The adversarial data suite: hostile videos, images, pose files, latent-cache shards, label files and manifests,
each run through prefalign's readers and data module in a child process under a memory cap and a watchdog
(``tests/hostile.py``). Each must end in a clear error naming the file and the field (or option), a counted skip
under ``on_bad_sample: skip``, or a correct result: never an allocation of gigabytes, a hang or a crash."""

from __future__ import annotations

import io
import json
import pickle
import struct
import zlib
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import quiet_trainer, tiny_wan
from hostile import Case, check
from prefalign.data import media
from prefalign.data.cache import FORMAT, MANIFEST, VERSION, CachedClipDataset, LatentCache
from prefalign.data.datamodule import PortraitDataModule, collate_clips, read_pose
from prefalign.data.errors import DataError
from prefalign.data.schema import load_manifest
from prefalign.data.synthetic import TalkingShapesConfig, write_dataset
from prefalign.module import AlignmentModule
from prefalign.pairs import import_labels
from prefalign.processes import FlowMatching

FRAMES, SIZE, FPS, RATE = 9, 32, 25, 16000
BOMB = 12000  # pixels a side: 144 MP, under PIL's own refusal (179 MP), far over media.MAX_FRAME_PIXELS


# --- hostile files -------------------------------------------------------------------------------------------------
def _encode(path: Path, times_ms: list[int], size: int = SIZE, audio: bool = False, fmt: str = "mp4") -> Path:
    """A video whose frame ``i`` shows at ``times_ms[i]`` (any spacing: variable frame rates), x264 ultrafast."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "threads": "1"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        if fmt == "mp4":
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        grid = np.add.outer(np.arange(size), np.arange(size)).astype(np.uint8)
        for index, time in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.stack([grid + index, grid, 255 - grid], -1), format="rgb24")
            frame.pts, frame.time_base = time, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _constant(count: int, fps: float) -> list[int]:
    return [round(i * 1000 / fps) for i in range(count)]


def _many_frames(path: Path, count: int, height: int = 16, width: int = 16) -> Path:
    """An mp4 of ``count`` frames in seconds: one intra frame's packet muxed ``count`` times."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS, options={"preset": "ultrafast", "x264-params": "keyint=1"})
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        packets = []
        for index in range(2):
            frame = av.VideoFrame.from_ndarray(np.zeros((height, width, 3), np.uint8), format="rgb24")
            frame.pts = index
            packets += stream.encode(frame)
        packets += stream.encode(None)
        data = bytes(packets[-1])  # not the first: it carries x264's settings as text
        for index in range(count):
            packet = av.Packet(data)
            packet.stream, packet.time_base = stream, Fraction(1, FPS)
            packet.pts = packet.dts = index
            packet.is_keyframe = True
            container.mux(packet)
    return path


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=RATE, layout="mono")
        tone = (0.3 * np.sin(np.arange(RATE) / 5)).astype(np.float32)
        for start in range(0, RATE, 1024):
            frame = av.AudioFrame.from_ndarray(tone[None, start : start + 1024].copy(), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = RATE, start, Fraction(1, RATE)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _wav(samples: np.ndarray, rate: int, channels: int = 1, data_size: int | None = None,
         float32: bool = False) -> bytes:
    """A RIFF wav written by hand (interleaved samples), so that what writers refuse gets in: a lying data size."""
    if float32:
        data = samples.astype("<f4").tobytes()
    else:
        data = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    width = 4 if float32 else 2
    fmt = struct.pack("<HHIIHH", 3 if float32 else 1, channels, rate, rate * width * channels, width * channels,
                      width * 8)
    size = len(data) if data_size is None else data_size
    body = b"WAVEfmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", min(len(body), 2**32 - 1)) + body


def _tone(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    wave = 0.4 * np.sin(2 * np.pi * 220 * np.arange(int(seconds * rate)) / rate)
    return np.repeat(wave[:, None], channels, axis=1).reshape(-1)


def _png_bomb(side: int) -> bytes:
    """A real RGBA png of ``side``² black pixels: 180 KB on disk, ``4 · side²`` bytes decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor, parts = zlib.compressobj(9), []
    rows = b"\x00" * (1 + 4 * side) * 200
    for _ in range(side // 200):
        parts.append(compressor.compress(rows))
    parts.append(compressor.flush())
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 6, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def _image(format: str, image: Image.Image | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    (image or Image.new("RGB", (16, 16), (10, 200, 30))).save(buffer, format=format, **options)
    return buffer.getvalue()


def _claiming(format: str, side: int) -> bytes:
    """A small image of ``format`` whose header claims ``side``² pixels (what PIL reports before decoding)."""
    data = bytearray(_image(format, Image.new("L", (16, 16), 3) if format == "TIFF" else None))
    if format == "JPEG":
        at = data.find(b"\xff\xc0")
        data[at + 5 : at + 9] = struct.pack(">HH", side, side)
    elif format == "GIF":
        data[6:10] = struct.pack("<HH", side, side)
    elif format == "WEBP":
        at = data.find(b"\x9d\x01\x2a")
        data[at + 3 : at + 7] = struct.pack("<HH", side, side)
    elif format == "TIFF":
        ifd = struct.unpack("<I", data[4:8])[0]
        for entry in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
            at = ifd + 2 + 12 * entry
            tag, kind = struct.unpack("<HH", data[at : at + 4])
            if tag in (256, 257):  # ImageWidth, ImageLength
                data[at + 8 : at + 12] = struct.pack("<HH", side, 0) if kind == 3 else struct.pack("<I", side)
    return bytes(data)


def _npy(array: np.ndarray, claim: str | None = None) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    data = bytearray(buffer.getvalue())
    if claim is not None:  # the header (padded with spaces) claims another shape
        length = struct.unpack("<H", data[8:10])[0]
        header = data[10 : 10 + length].decode("latin1")
        start, end = header.index("'shape': (") + len("'shape': "), header.index(")") + 1
        header = (header[:start] + claim + header[end:]).rstrip("\n ")
        data[10 : 10 + length] = (header + " " * (length - 1 - len(header)) + "\n").encode("latin1")
    return bytes(data)


# --- the clean clip, manifests and caches ----------------------------------------------------------------------------
@dataclass
class World:
    folder: Path
    clean: dict  # a clean row: absolute paths of video, audio, reference, pose
    files: dict[str, Path]

    def path(self, name: str) -> str:
        return str(self.files[name])

    def manifest(self, name: str, rows: list[dict]) -> str:
        path = self.folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    def row(self, clip_id: str = "good", **changes) -> dict:
        row = {"id": clip_id, **self.clean, **changes}
        return {key: value for key, value in row.items() if value is not None}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    folder = tmp_path_factory.mktemp("hostile")
    cfg = TalkingShapesConfig(num_frames=FRAMES, size=SIZE, fps=FPS, sample_rate=RATE)
    manifest = write_dataset(folder / "clean", num_clips=2, seed=0, cfg=cfg)
    # The first manifest that HF datasets reads maps 1.5 GB of address space (pyarrow's allocator, thread pools):
    # read one here, so that the cases' memory caps measure the case and not that.
    load_manifest(str(manifest))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    clean = {key: str(manifest.parent / rows[0][key]) for key in ("video", "audio", "reference", "pose")}
    files = {"video2": manifest.parent / rows[1]["video"], "audio2": manifest.parent / rows[1]["audio"]}

    def put(name: str, data: bytes) -> None:
        files[name] = folder / name
        files[name].write_bytes(data)

    # Video.
    files["4k.mp4"] = _many_frames(folder / "4k.mp4", 120, 2160, 3840)  # 3 GB decoded
    files["100k.mp4"] = _many_frames(folder / "100k.mp4", 100_000)
    files["60.h264"] = _encode(folder / "60.h264", _constant(60, FPS), fmt="h264")  # no frame count in the header
    vfr = [i * 20 for i in range(12)] + [240 + i * 60 for i in range(13)]  # 25 frames over 1 s: 50 fps, then 16.7
    files["vfr.mp4"] = _encode(folder / "vfr.mp4", vfr)
    files["jitter.mp4"] = _encode(folder / "jitter.mp4", [i * 40 + (3 if i % 2 else 0) for i in range(FRAMES)])
    for fps in (30, 24):
        files[f"{fps}fps.mp4"] = folder / f"{fps}fps.mp4"
        media.write_video(files[f"{fps}fps.mp4"], np.zeros((FRAMES, SIZE, SIZE, 3), np.uint8), fps)
    files["audio_only.mp4"] = _audio_only(folder / "audio_only.mp4")
    big = (np.add.outer(np.arange(48), np.arange(48)) * 2).astype(np.uint8)
    files["48px.mp4"] = folder / "48px.mp4"
    media.write_video(files["48px.mp4"], np.stack([np.stack([big, big, big], -1)] * FRAMES), FPS,
                      audio=_tone(FRAMES / FPS, RATE), sample_rate=RATE)
    long = np.stack([np.full((SIZE, SIZE, 3), 90, np.uint8)] * (FRAMES + 4))
    files["13frames.mp4"] = folder / "13frames.mp4"
    media.write_video(files["13frames.mp4"], long, FPS, audio=_tone((FRAMES + 4) / FPS, RATE), sample_rate=RATE)
    # Audio.
    put("claims_74h.wav", _wav(_tone(1, RATE), RATE, data_size=2**32 - 100))
    put("11min.wav", _wav(_tone(660, 8000), 8000))
    put("mono.wav", _wav(_tone(1, RATE), RATE))
    put("stereo.wav", _wav(_tone(1, 44100, 2), 44100, channels=2))
    put("8ch.wav", _wav(_tone(1, RATE, 8), RATE, channels=8))
    put("12ch.wav", _wav(_tone(1, RATE, 12), RATE, channels=12))
    put("4hz.wav", _wav(_tone(4, 4), 4))
    put("96k.wav", _wav(_tone(1, 96000), 96000))
    put("nan.wav", _wav(np.where(np.arange(RATE) == 7, np.nan, _tone(1, RATE)), RATE, float32=True))
    # Images.
    put("bomb.png", _png_bomb(BOMB))
    for format in ("JPEG", "GIF", "TIFF", "WEBP"):
        put(f"bomb.{format.lower()}", _claiming(format, BOMB))
    put("over_pil.png", _claiming_png(20000))
    put("1x1.png", _image("PNG", Image.new("RGB", (1, 1), (1, 2, 3))))
    grey16 = np.full((SIZE, SIZE), 32896, np.uint16)  # 128 · 257: mid grey
    put("grey16.png", _image("PNG", Image.fromarray(grey16)))
    put("float.tiff", _image("TIFF", Image.fromarray(np.full((SIZE, SIZE), 0.5, np.float32))))
    put("cmyk.jpg", _image("JPEG", Image.new("CMYK", (SIZE, SIZE), (0, 0, 0, 0))))
    palette = Image.new("P", (SIZE, SIZE), 1)
    palette.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    put("palette.png", _image("PNG", palette))
    put("la.png", _image("PNG", Image.new("LA", (SIZE, SIZE), (77, 3))))
    noise = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), np.uint8)
    put("truncated.png", _image("PNG", Image.fromarray(noise))[:300])
    # Pose.
    pose = np.load(clean["pose"])
    put("pixels.npy", _npy(pose * 512))
    put("slightly_out.npy", _npy(np.clip(pose * 1.4 - 0.2, -0.45, 1.45)))
    put("nan.npy", _npy(np.where(np.arange(pose.size).reshape(pose.shape) == 3, np.nan, pose).astype(np.float32)))
    put("inf.json", json.dumps(np.where(np.arange(pose.size).reshape(pose.shape) == 5, np.inf, pose).tolist()).encode())
    put("xyz.npy", _npy(np.zeros((FRAMES, 8, 3), np.float32)))
    put("flat.npy", _npy(np.zeros((FRAMES, 16), np.float32)))
    put("claims_50GB.npy", _npy(pose, claim="(100000000, 68, 2)"))
    put("pickle.npy", pickle.dumps(pose))
    put("object.npy", _npy(np.array([[[0.5, 0.5]]] * FRAMES, dtype=object)))
    put("deep.json", b"[" * 100_000 + b"]" * 100_000)
    put("dicts.json", json.dumps([[{"x": 0.5, "y": 0.5}]] * FRAMES).encode())
    put("ragged.json", json.dumps([[[0.5, 0.5]], [[0.5, 0.5], [0.1, 0.2]]]).encode())
    put("bool.json", json.dumps([[[True, False]]] * FRAMES).encode())
    files["huge.json"] = folder / "huge.json"
    with open(files["huge.json"], "wb") as handle:
        handle.truncate(65 * 2**20)  # sparse: no disk
    put("5kp.npy", _npy(np.full((FRAMES, 5, 2), 0.5, np.float32)))
    return World(folder, clean, files)


def _claiming_png(side: int) -> bytes:
    """A small png whose IHDR (with a matching CRC) claims ``side``² pixels."""
    data = bytearray(_image("PNG"))
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _cache(world: World, name: str, **tensors) -> str:
    """A one-window latent cache written by hand; ``tensors`` replace the clean ones."""
    folder = world.folder / name
    folder.mkdir()
    clean = {"latents": torch.zeros(3, FRAMES, 4, 4), "audio": torch.zeros(FRAMES * RATE // FPS),
             "reference": torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)}
    clean.update(tensors)
    save_file({f"000000/{field}": tensor for field, tensor in clean.items()}, str(folder / "shard-00000.safetensors"))
    codec = {"class": "x", "config": {}, "frame_size": [SIZE, SIZE], "latent_shape": [3, FRAMES, 4, 4]}
    fingerprint = {"codec": codec, "audio_encoder": None, "fps": float(FPS), "sample_rate": RATE, "num_frames": FRAMES,
                   "dtype": "float32"}
    manifest = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "source": "m.jsonl", "split": "train",
                "stride": FRAMES, "fields": sorted(clean), "counts": {}, "shards": ["shard-00000.safetensors"],
                "entries": [{"id": "window0", "shard": "shard-00000.safetensors", "key": "000000", "row": 0,
                             "start_frame": 0}]}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return str(folder)


# --- what a case does ------------------------------------------------------------------------------------------------
def _module(world: World, rows: list[dict], name: str, **options) -> PortraitDataModule:
    settings = dict(train=world.manifest(name, rows), val_fraction=0.0, num_frames=FRAMES, batch_size=1)
    settings.update(options)
    return PortraitDataModule(**settings)


def _first(world: World, rows: list[dict], name: str, fields=None, **options) -> dict:
    """Item 0 of the train split, through the data module's collate."""
    dm = _module(world, rows, name, **options)
    if fields is not None:
        dm.use_fields(fields)
    return collate_clips([dm.dataset("train")[0]], on_bad_sample=dm.on_bad_sample)


def _skipped(world: World, rows: list[dict], name: str, field: str, **options) -> Callable[[], None]:
    """Under ``skip``: row 0 is bad, counted once with ``field``, and row 1 stands in for it."""
    def run() -> None:
        batch = _first(world, rows, name, on_bad_sample="skip", **options)
        assert batch["skipped"] == 1 and batch["size"] == 1, batch
        record = batch["skipped_samples"][0]
        assert record.field == field and record.id == rows[0]["id"], record
    return run


def _batch_of(world: World, rows: list[dict], name: str, on_bad_sample: str = "raise", **options) -> dict:
    dm = _module(world, rows, name, on_bad_sample=on_bad_sample, **options)
    dataset = dm.dataset("train")
    return collate_clips([dataset[i] for i in range(len(rows))], on_bad_sample=on_bad_sample)


def _no_num_frames_hint(run: Callable[[], object]) -> Callable[[], object]:
    def wrapped():
        try:
            return run()
        except DataError as error:
            assert "num_frames" not in str(error), f"a size mismatch suggests num_frames: {error}"
            raise
    return wrapped


def _returns(run: Callable[[], object], test: Callable[[object], bool], what: str) -> Callable[[], None]:
    def wrapped() -> None:
        result = run()
        assert test(result), f"{what}: got {result!r}"[:500]
    return wrapped


def _labels(world: World, name: str, data: bytes) -> Callable[[], object]:
    def run():
        path = world.folder / name
        path.write_bytes(data)
        return import_labels(str(path), str(world.folder / f"out_{name}"))
    return run


GOOD_LABEL = {"video_a": "a.mp4", "video_b": "b.mp4", "lip_sync": "a"}


def _jsonl(*rows) -> bytes:
    return b"".join((row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows)


# --- the cases -------------------------------------------------------------------------------------------------------
def _cases(w: World) -> list[Case]:
    video, image, pose = media.read_video, media.read_image, read_pose
    grey = lambda a: a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8  # noqa: E731
    second = {"id": "second", "video": str(w.files["video2"]), "audio": str(w.files["audio2"])}
    base = ("video", "audio", "reference")
    cases = [
        # Video: sizes and counts judged from the header, before decoding.
        Case("video_4k_frames", lambda: video(w.path("4k.mp4")), ("4k.mp4", "field 'video'", "3840x2160",
                                                                    "max_frame_pixels")),
        Case("video_4k_frames_skipped", _skipped(w, [w.row("4k", video=w.path("4k.mp4")), w.row()], "m_4k", "video"),
             expect="ok"),
        Case("video_4k_rejected", lambda: _first(w, [w.row(rejected=w.path("4k.mp4"))], "m_4k_rejected"),
             ("4k.mp4", "field 'rejected'", "max_frame_pixels")),
        Case("video_100k_frames_header", lambda: video(w.path("100k.mp4")),
             ("100k.mp4", "100000 frames", "max_frames")),
        Case("video_count_without_header", lambda: video(w.path("60.h264"), max_frames=50),
             ("60.h264", "more than 50 frames", "max_frames")),
        Case("video_max_frames_option",
             lambda: _first(w, [w.row(video=w.path("13frames.mp4"))], "m_max", max_frames=12),
             ("13frames.mp4", "field 'video'", "13 frames", "max_frames")),
        Case("video_max_frame_pixels_option",
             lambda: _first(w, [w.row()], "m_maxpx", max_frame_pixels=SIZE * SIZE - 1),
             ("field 'video'", "max_frame_pixels")),
        Case("video_max_frames_must_be_positive", lambda: PortraitDataModule(max_frames=0), ("max_frames",)),
        Case("video_no_frame_stream", lambda: video(w.path("audio_only.mp4")), ("audio_only.mp4", "no video stream")),
        # Video: frame rates.
        Case("video_variable_frame_rate", lambda: video(w.path("vfr.mp4")),
             ("vfr.mp4", "field 'video'", "variable frame rate", "fps_mode cfr")),
        Case("video_variable_frame_rate_skipped",
             _skipped(w, [w.row("vfr", video=w.path("vfr.mp4")), w.row()], "m_vfr", "video"), expect="ok"),
        Case("video_jitter_of_3ms_is_constant", _returns(lambda: video(w.path("jitter.mp4")),
                                                         lambda r: r[0].shape[0] == FRAMES and r[1] == FPS, "frames"),
             expect="ok"),
        Case("video_30fps_for_25", lambda: _first(w, [w.row(video=w.path("30fps.mp4"))], "m_30"),
             ("30fps.mp4", "field 'video'", "30 fps", "data.fps", "-r 25")),
        Case("video_24fps_for_25", lambda: _first(w, [w.row(video=w.path("24fps.mp4"))], "m_24"),
             ("24fps.mp4", "24 fps", "data.fps")),
        # Audio.
        # FFmpeg bounds a wav's data size by the file's: the second of audio there is read, correctly.
        Case("audio_header_claims_74_hours", _returns(lambda: media.read_audio(w.path("claims_74h.wav")),
                                                      lambda a: a.shape == (RATE,), "1 s"), expect="ok"),
        Case("audio_of_11_minutes", lambda: media.read_audio(w.path("11min.wav")),
             ("11min.wav", "MAX_AUDIO_SECONDS")),
        Case("audio_mono", _returns(lambda: media.read_audio(w.path("mono.wav")), lambda a: a.shape == (RATE,), "1 s"),
             expect="ok"),
        Case("audio_stereo_44k", _returns(lambda: media.read_audio(w.path("stereo.wav")),
                                          lambda a: abs(a.shape[0] - RATE) <= 1, "1 s at 16 kHz"), expect="ok"),
        Case("audio_8_channels", _returns(lambda: media.read_audio(w.path("8ch.wav")),
                                          lambda a: a.shape == (RATE,), "1 s"), expect="ok"),
        Case("audio_12_channels", _returns(lambda: media.read_audio(w.path("12ch.wav")),
                                           lambda a: a.shape == (RATE,), "1 s"), expect="ok"),
        Case("audio_4_hz", lambda: media.read_audio(w.path("4hz.wav")), ("4hz.wav", "sample rate")),
        Case("audio_96k", _returns(lambda: media.read_audio(w.path("96k.wav")),
                                   lambda a: abs(a.shape[0] - RATE) <= 1, "1 s at 16 kHz"), expect="ok"),
        Case("audio_96k_without_resampling", lambda: media.read_audio(w.path("96k.wav"), resample=False),
             ("96k.wav", "96000")),
        Case("audio_nan", lambda: media.read_audio(w.path("nan.wav")), ("nan.wav", "NaN")),
        # Images: bombs judged from the header, before decoding.
        Case("image_png_bomb", lambda: image(w.path("bomb.png")), ("bomb.png", "field 'reference'", "12000x12000",
                                                                   "max_frame_pixels")),
        Case("image_png_bomb_skipped",
             _skipped(w, [w.row("bomb", reference=w.path("bomb.png")), w.row()], "m_bomb", "reference"), expect="ok"),
        *[Case(f"image_{kind}_bomb", lambda kind=kind: image(w.path(f"bomb.{kind}")),
               (f"bomb.{kind}", "12000x12000", "max_frame_pixels")) for kind in ("jpeg", "gif", "tiff", "webp")],
        Case("image_past_pil_limit", lambda: image(w.path("over_pil.png")), ("over_pil.png", "too large")),
        Case("image_1x1", _returns(lambda: image(w.path("1x1.png")), lambda a: a.tolist() == [[[1, 2, 3]]], "1x1"),
             expect="ok"),
        Case("image_1x1_against_video", lambda: _first(w, [w.row(reference=w.path("1x1.png"))], "m_1x1"),
             ("1x1.png", "field 'reference'", "1x1")),
        Case("image_16_bit_grey", _returns(lambda: image(w.path("grey16.png")),
                                           lambda a: grey(a) and (a == 128).all(), "mid grey"), expect="ok"),
        Case("image_float_tiff", lambda: image(w.path("float.tiff")), ("float.tiff", "floating-point")),
        Case("image_cmyk", _returns(lambda: image(w.path("cmyk.jpg")), grey, "RGB"), expect="ok"),
        Case("image_palette", _returns(lambda: image(w.path("palette.png")),
                                       lambda a: grey(a) and a[0, 0].tolist() == [200, 10, 10], "red"), expect="ok"),
        Case("image_grey_alpha", _returns(lambda: image(w.path("la.png")),
                                          lambda a: grey(a) and (a == 77).all(), "grey 77"), expect="ok"),
        Case("image_truncated", lambda: image(w.path("truncated.png")), ("truncated.png", "field 'reference'")),
        # Pose.
        Case("pose_in_pixels", lambda: pose(w.path("pixels.npy")),
             ("pixels.npy", "field 'pose'", "range", "[-0.5, 1.5]")),
        Case("pose_in_pixels_skipped",
             _skipped(w, [w.row("pixels", pose=w.path("pixels.npy")), w.row()], "m_pixels", "pose"), expect="ok"),
        Case("pose_slightly_outside_the_frame",
             _returns(lambda: pose(w.path("slightly_out.npy")), lambda p: p.shape == (FRAMES, 8, 2), "keypoints"),
             expect="ok"),
        Case("pose_nan", lambda: pose(w.path("nan.npy")), ("nan.npy", "NaN")),
        Case("pose_json_infinity", lambda: pose(w.path("inf.json")), ("inf.json", "infinity")),
        Case("pose_xyz", lambda: pose(w.path("xyz.npy")), ("xyz.npy", "[frames, points, 2]")),
        Case("pose_flat", lambda: pose(w.path("flat.npy")), ("flat.npy", "[frames, points, 2]")),
        Case("pose_header_claims_50GB", lambda: pose(w.path("claims_50GB.npy")), ("claims_50GB.npy", "header says")),
        Case("pose_file_of_65MB", lambda: pose(w.path("huge.json")), ("huge.json", "MAX_POSE_BYTES")),
        Case("pose_pickle", lambda: pose(w.path("pickle.npy")), ("pickle.npy", "field 'pose'")),
        Case("pose_object_array", lambda: pose(w.path("object.npy")), ("object.npy", "field 'pose'")),
        Case("pose_json_nested_100k_deep", lambda: pose(w.path("deep.json")), ("deep.json", "field 'pose'")),
        Case("pose_json_objects", lambda: pose(w.path("dicts.json")), ("dicts.json", "numbers")),
        Case("pose_json_ragged", lambda: pose(w.path("ragged.json")), ("ragged.json", "field 'pose'")),
        Case("pose_json_booleans", lambda: pose(w.path("bool.json")), ("bool.json", "numbers")),
        # Latent cache: a bad window is a DataError naming the shard and window, or a counted skip.
        Case("cache_nan_latents", lambda: CachedClipDataset(LatentCache(_cache(w, "c_nan", latents=torch.full(
            (3, FRAMES, 4, 4), float("nan")))))[0], ("shard-00000.safetensors", "window0", "field 'latents'", "NaN")),
        Case("cache_inf_audio", lambda: LatentCache(_cache(w, "c_inf", audio=torch.full(
            (FRAMES * RATE // FPS,), float("inf")))).read(0), ("shard-00000.safetensors", "window0", "field 'audio'")),
        Case("cache_float64_overflow", lambda: LatentCache(_cache(w, "c_f64", latents=torch.full(
            (3, FRAMES, 4, 4), 1e300, dtype=torch.float64))).read(0), ("shard-00000.safetensors", "infinity")),
        Case("cache_nan_skipped", _returns(lambda: collate_clips([CachedClipDataset(LatentCache(_cache(
            w, "c_skip", latents=torch.full((3, FRAMES, 4, 4), float("nan")))), on_bad_sample="skip")[0]]),
            lambda b: b["skipped"] == 1 and b["size"] == 0 and b["skipped_samples"][0].field == "latents", "a skip"),
             expect="ok"),
        Case("cache_integer_latents", lambda: LatentCache(_cache(w, "c_int", latents=torch.zeros(
            (3, FRAMES, 4, 4), dtype=torch.int64))).read(0), ("shard-00000.safetensors", "int64", "field 'latents'")),
        Case("cache_float_reference", lambda: LatentCache(_cache(w, "c_ref", reference=torch.zeros(
            (3, SIZE, SIZE)))).read(0), ("shard-00000.safetensors", "uint8", "field 'reference'")),
        Case("cache_truncated_shard", lambda: LatentCache(_truncated(_cache(w, "c_cut"))),
             ("shard-00000.safetensors",)),
        # Labels (prefalign labels): the file and the line.
        Case("labels_row_is_a_list", _labels(w, "list.jsonl", _jsonl(GOOD_LABEL, ["a.mp4", "b.mp4", "a"])),
             ("list.jsonl", "line 2", "array")),
        Case("labels_int_as_path", _labels(w, "int.jsonl", _jsonl({**GOOD_LABEL, "video_a": 7})),
             ("int.jsonl", "line 1", "field 'video_a'")),
        Case("labels_list_as_path", _labels(w, "listpath.jsonl", _jsonl({**GOOD_LABEL, "reference": ["r.png"]})),
             ("listpath.jsonl", "line 1", "field 'reference'")),
        Case("labels_list_vote", _labels(w, "listvote.jsonl", _jsonl(GOOD_LABEL, {**GOOD_LABEL, "motion": ["a"]})),
             ("listvote.jsonl", "line 2", "field 'motion'")),
        Case("labels_dict_vote", _labels(w, "dictvote.jsonl", _jsonl({**GOOD_LABEL, "lip_sync": {"a": 1}})),
             ("dictvote.jsonl", "line 1", "field 'lip_sync'")),
        Case("labels_not_utf8", _labels(w, "latin1.jsonl", _jsonl(GOOD_LABEL, b'{"video_a": "caf\xe9.mp4"}')),
             ("latin1.jsonl", "line 2", "UTF-8")),
        Case("labels_invalid_json_line", _labels(w, "broken.jsonl", b"\n" + _jsonl(GOOD_LABEL, b"{oops")),
             ("broken.jsonl", "line 3", "JSON")),
        Case("labels_null_row", _labels(w, "null.jsonl", _jsonl(GOOD_LABEL, None)), ("null.jsonl", "line 2", "null")),
        Case("labels_list_id", _labels(w, "listid.jsonl", _jsonl({**GOOD_LABEL, "id": [1]})),
             ("listid.jsonl", "line 1", "field 'id'")),
        # Manifests: pose in some rows only, clips of another size in one batch.
        Case("manifest_pose_in_some_rows", lambda: _first(w, [w.row("nopose", pose=None), w.row()], "m_some"),
             ("m_some.jsonl", "field 'pose'", "row 0", "nopose")),
        Case("manifest_pose_in_some_rows_skipped",
             _skipped(w, [w.row("nopose", pose=None), w.row()], "m_some_skip", "pose"), expect="ok"),
        Case("manifest_pose_in_some_rows_unused",
             _returns(lambda: _first(w, [w.row("nopose", pose=None), w.row()], "m_some_unused", fields=base),
                      lambda b: b["size"] == 1 and "pose" not in b, "a batch without pose"), expect="ok"),
        Case("manifest_broken_pose_unused",
             _returns(lambda: _first(w, [w.row(pose=w.path("pickle.npy"))], "m_broken_unused", fields=base),
                      lambda b: b["size"] == 1 and b["skipped"] == 0 and "pose" not in b, "a clean batch"),
             expect="ok"),
        Case("manifest_broken_pose_used",
             lambda: _first(w, [w.row(pose=w.path("pickle.npy"))], "m_broken_used", fields={*base, "pose"}),
             ("pickle.npy", "field 'pose'")),
        Case("manifest_pose_partial_is_available_under_skip_only", _returns(
            lambda: (_module(w, [w.row("nopose", pose=None), w.row()], "m_avail").available_fields("train"),
                     _module(w, [w.row("nopose", pose=None), w.row()], "m_avail2",
                             on_bad_sample="skip").available_fields("train")),
            lambda r: "pose" not in r[0] and "pose" in r[1], "pose available under skip only"), expect="ok"),
        Case("batch_clip_of_another_size",
             _no_num_frames_hint(lambda: _batch_of(w, [w.row(pose=None), w.row("big", video=w.path("48px.mp4"),
                                                   audio=None, reference=None, pose=None)], "m_size")),
             ("48px.mp4", "field 'video'", "big", "frame size")),
        Case("batch_clip_of_another_size_skipped", _returns(
            lambda: _batch_of(w, [w.row(pose=None), second, w.row("big", video=w.path("48px.mp4"), audio=None,
                                                                  reference=None, pose=None)], "m_size_skip",
                              on_bad_sample="skip"),
            lambda b: b["size"] == 2 and b["skipped"] == 1 and b["skipped_samples"][0].path == w.path("48px.mp4")
            and tuple(b["video"].shape) == (2, FRAMES, 3, SIZE, SIZE), "the odd clip skipped"), expect="ok"),
        Case("batch_clip_of_another_length", lambda: _batch_of(
            w, [w.row(pose=None), w.row("long", video=w.path("13frames.mp4"), audio=None, pose=None)], "m_len",
            num_frames=None), ("13frames.mp4", "long", "num_frames")),
        Case("batch_pose_of_other_keypoints", lambda: _batch_of(
            w, [w.row(), {**second, "id": "k5", "pose": w.path("5kp.npy")}], "m_kp"), ("5kp.npy", "keypoints")),
    ]
    return cases


def _truncated(folder: str) -> str:
    shard = Path(folder) / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    return folder


@pytest.fixture(scope="module")
def cases(world) -> dict[str, Case]:
    return {case.name: case for case in _cases(world)}


def _names() -> list[str]:
    """The case names, read from ``_cases`` on a world of placeholders (nothing is built at collection)."""

    class Placeholders(dict):
        def __missing__(self, key):
            return Path(key)

    placeholder = World(Path("/nonexistent"), {"video": "v", "audio": "a", "reference": "r", "pose": "p"},
                        Placeholders())
    placeholder.manifest = lambda name, rows: name  # type: ignore[method-assign]
    return [case.name for case in _cases(placeholder)]


@pytest.mark.parametrize("name", _names())
def test_hostile_data(cases, name) -> None:
    assert check(cases[name]) is None


def test_a_run_that_reads_no_pose_trains_on_broken_pose_files(world) -> None:
    """A fit of a denoiser without a skeleton and SFT without a mouth weight: pose given in some rows only, one of
    them broken, is never read (the module's setup tells the data module the fields it uses)."""
    rows = [world.row("a", pose=world.path("pickle.npy")), world.row("b", pose=None),
            {**world.row("c"), "video": str(world.files["video2"]), "audio": str(world.files["audio2"])}]
    dm = PortraitDataModule(train=world.manifest("m_fit", rows), val_fraction=0.0, batch_size=3, num_frames=FRAMES)
    module = AlignmentModule(tiny_wan(), FlowMatching())
    assert "pose" not in module.data_fields()
    quiet_trainer(max_steps=1).fit(module, datamodule=dm)
    assert dm.fields is not None and "pose" not in dm.fields
    assert module.trainer.global_step == 1
