"""Video, audio and image I/O: PyAV (FFmpeg) for mp4 and wav, soxr for resampling, PIL for png.

Readers turn any bad file into a ``DataError`` naming the file and the manifest field; writers write atomically.
"""

from __future__ import annotations

import os
import stat
import warnings
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soxr
from PIL import Image

from prefalign.data.errors import DataError
from prefalign.files import inside, temp_path, unique_files

# PyAV 17 and later convert frames with a pool of swscale slice threads (``threads=0``: one per CPU). In processes
# forked from one that had decoded video (a DataLoader worker, the hostile suite's cases) that pool has been seen
# to wait forever for its workers; one thread has no pool to wait on. Every pixel-format conversion here (decoding
# to RGB, RGB to the encoder's yuv420p) passes it. PyAV before 17 converts in one thread and has no such option.
ONE_THREAD_SCALING = {"threads": 1} if int(av.__version__.split(".")[0]) >= 17 else {}

SILENCE_PEAK = 1e-4
"""A track whose peak amplitude is below this is treated as silent (no speech to align to)."""

MAX_PEAK = 2.0
"""Samples are nominally in [-1, 1]; a float file peaking above this (6 dB over full scale) is corrupt or mis-scaled."""

MIN_SAMPLE_RATE = 8000
"""Below this rate speech is not intelligible; such a file is almost certainly a mistake."""

VIDEO_CRF = 10
"""x264 constant rate factor: low enough that decoded frames are within a few grey levels of the originals."""

MAX_FRAME_PIXELS = 2048 * 2048
"""Pixels per video frame or image above which a file is refused before anything is decoded (``data.max_frame_pixels``
sets it for the data module): 1080p either way up (1920x1080, 2.1 MP) and squares up to 2048 fit, 4K UHD (8.3 MP) does
not. A frame of this size decodes to 12.6 MB."""

MAX_FRAMES = 4500
"""Frames per video above which a file is refused (``data.max_frames`` sets it for the data module): 3 minutes at
25 fps. Judged from the container's frame count before decoding, and by counting frames as they decode where the
header lies or says nothing. One clip decodes to at most ``MAX_FRAMES x MAX_FRAME_PIXELS x 3`` bytes: cut longer
sources into clips."""

MAX_AUDIO_SECONDS = 600.0
"""Audio longer than this is refused (from its header where it says, else by counting samples as they decode): a
clip's track is seconds to minutes long; hours of audio in a small file are a mistake or a bomb."""

VFR_TOLERANCE = 0.5
"""How far, in frame periods, a frame's timestamp may be from the constant-rate grid ``t0 + i / fps`` before the
video counts as variable-frame-rate (its frames would be paired with the wrong audio)."""

CFR_HINT = (
    "re-encode it at the data's constant frame rate (data.fps), e.g. "
    "ffmpeg -i in.mp4 -r 25 -fps_mode cfr out.mp4 (older ffmpeg: -vsync cfr)"
)
"""What to do about a variable or wrong frame rate: resampling frames by their timestamps is not done here."""


def check_file(path: str | Path, field: str) -> None:
    """Raise a ``DataError`` unless ``path`` is a regular file: not missing, a directory, a fifo (which would block
    its reader forever), a name too long or a symlink loop."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise DataError("file not found", path=path, field=field) from None
    except (OSError, ValueError) as error:  # ValueError: a NUL byte in the name
        raise DataError(f"cannot access the file ({error})", path=path, field=field) from None
    if not stat.S_ISREG(mode):
        raise DataError("not a regular file", path=path, field=field)


def _open_input(path: str | Path, field: str) -> av.container.InputContainer:
    check_file(path, field)
    try:
        # Tags in another encoding than UTF-8 (old encoders write Latin-1) must not make the file unreadable.
        return av.open(os.fspath(path), mode="r", metadata_errors="replace")
    except av.FFmpegError as error:
        raise DataError(f"cannot open as media: {error}", path=path, field=field) from error


def _first_stream(container: av.container.InputContainer, kind: str, path: str | Path, field: str) -> av.stream.Stream:
    streams = container.streams.video if kind == "video" else container.streams.audio
    if not streams:
        raise DataError(f"has no {kind} stream", path=path, field=field)
    # A damaged codec id leaves the stream without a decoder; PyAV then raises AttributeError on its rate or size.
    if streams[0].codec_context is None:
        raise DataError(f"no decoder for its {kind} stream (unknown or damaged codec)", path=path, field=field)
    return streams[0]


def read_video(
    path: str | Path,
    field: str = "video",
    max_frames: int = MAX_FRAMES,
    max_frame_pixels: int = MAX_FRAME_PIXELS,
) -> tuple[np.ndarray, float]:
    """Decode every frame of the first video stream, at a constant frame rate.

    Args:
        path (str | Path): a video file (mp4 or anything FFmpeg reads).
        field (str): the manifest field named in errors.
        max_frames (int): more frames than this is an error (``MAX_FRAMES``).
        max_frame_pixels (int): frames of more pixels than this are an error (``MAX_FRAME_PIXELS``).

    Returns:
        tuple[np.ndarray, float]: uint8 frames ``[T, H, W, 3]`` (RGB) and the frame rate.

    Raises:
        DataError: missing, corrupt or truncated file, no video stream, no frames, frames of several sizes, frames
            or a frame count over the limits (from the header, before decoding; or counted while decoding), or a
            variable frame rate (timestamps off the ``1 / rate`` grid by more than ``VFR_TOLERANCE`` frames).
    """
    # Errors name the path as given (Path() would also turn a URL's "//" into "/").
    with _open_input(path, field) as container:
        stream = _first_stream(container, "video", path, field)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or rate <= 0:
            raise DataError("video stream has no frame rate", path=path, field=field)
        expected = stream.frames  # from the container index; 0 when unknown
        # The header's size and count, before a frame is decoded: a tiny file may hold 4K frames or 100k of them.
        _check_frame_size(stream.codec_context.width, stream.codec_context.height, max_frame_pixels, path, field)
        if expected > max_frames:
            raise DataError(_too_many_frames(f"{expected} frames (its header says)", max_frames), path=path,
                            field=field)
        frames, times = [], []
        try:
            for frame in container.decode(stream):
                # Where the header lied: each frame's size before its pixels are converted, and the count so far.
                _check_frame_size(frame.width, frame.height, max_frame_pixels, path, field)
                if len(frames) == max_frames:
                    raise DataError(_too_many_frames(f"more than {max_frames} frames", max_frames), path=path,
                                    field=field)
                frames.append(frame.to_ndarray(format="rgb24", **ONE_THREAD_SCALING))
                times.append(None if frame.pts is None or frame.time_base is None else frame.pts * frame.time_base)
        except av.FFmpegError as error:
            raise DataError(f"cannot decode video: {error}", path=path, field=field) from error
    if not frames:
        raise DataError("video has no frames", path=path, field=field)
    # A cut file whose index sits at the front still opens and decodes; only the count gives it away. Two frames
    # of slack: an edit list may legitimately hide a frame or two that the index still counts.
    if expected and len(frames) < expected - 2:
        raise DataError(f"video is truncated: decoded {len(frames)} of {expected} frames", path=path, field=field)
    if len({frame.shape for frame in frames}) > 1:
        raise DataError("the frame size changes within the video", path=path, field=field)
    _check_constant_rate(times, rate, path, field)
    return np.stack(frames), float(rate)


def _check_frame_size(width: int, height: int, max_frame_pixels: int, path, field: str) -> None:
    if width * height > max_frame_pixels:
        raise DataError(
            f"frames are {width}x{height} ({width * height} pixels), above the limit of {max_frame_pixels} "
            "(data.max_frame_pixels, default media.MAX_FRAME_PIXELS): downscale the video",
            path=path,
            field=field,
        )


def _too_many_frames(found: str, max_frames: int) -> str:
    return (f"the video has {found}, above the limit of {max_frames} (data.max_frames, default media.MAX_FRAMES): "
            "cut it into shorter clips")


def _check_constant_rate(times: list, rate: Fraction, path, field: str) -> None:
    """Refuse a video whose frame ``i`` is not at ``t0 + i / rate``: frames are paired with audio by index, so a
    variable frame rate (or a stated rate its timestamps do not follow) would pair them with the wrong audio."""
    if len(times) < 2 or any(time is None for time in times):
        return  # no timestamps to judge by (a raw stream): the stated rate is all there is
    start, period = times[0], 1 / Fraction(rate)
    worst = max(range(len(times)), key=lambda i: abs(times[i] - start - i * period))
    drift = abs(times[worst] - start - worst * period) / period
    if drift > VFR_TOLERANCE:
        span = float(times[-1] - start + period)
        raise DataError(
            f"variable frame rate: frame {worst} is at {float(times[worst] - start):.3f} s, a constant "
            f"{float(rate):g} fps puts it at {float(worst * period):.3f} s (the {len(times)} frames span {span:.3f} s, "
            f"not {float(len(times) * period):.3f} s); {CFR_HINT}",
            path=path,
            field=field,
        )


def read_audio(
    path: str | Path,
    sample_rate: int = 16000,
    resample: bool = True,
    field: str = "audio",
) -> np.ndarray:
    """Decode the first audio stream of a wav or mp4 as mono float32 at ``sample_rate``.

    Args:
        path (str | Path): a wav file, or a video file with an audio track.
        sample_rate (int): the rate the caller needs, in Hz.
        resample (bool): resample (soxr) when the file's rate differs; if False, a different rate is an error.
        field (str): the manifest field named in errors.

    Returns:
        np.ndarray: float32 ``[S]`` in [-1, 1] (float files: at most ``MAX_PEAK``); channels are averaged.

    Raises:
        DataError: missing or corrupt file, no audio stream, a rate below 8 kHz, a rate mismatch with
            ``resample=False``, a silent track, samples that are NaN, infinite or above ``MAX_PEAK``, or a track
            longer than ``MAX_AUDIO_SECONDS`` (from its header, before decoding; or counted while decoding).
    """
    with _open_input(path, field) as container:
        stream = _first_stream(container, "audio", path, field)
        file_rate = stream.rate
        if not file_rate or file_rate < MIN_SAMPLE_RATE:
            raise DataError(
                f"audio sample rate is {file_rate} Hz, below the minimum of {MIN_SAMPLE_RATE} Hz",
                path=path,
                field=field,
            )
        if file_rate != sample_rate and not resample:
            raise DataError(
                f"audio sample rate is {file_rate} Hz, expected {sample_rate} Hz (resampling is off)",
                path=path,
                field=field,
            )
        expected = None
        if stream.duration is not None and stream.time_base is not None:
            expected = float(stream.duration * stream.time_base) * file_rate
        limit = int(MAX_AUDIO_SECONDS * file_rate)
        if expected is not None and expected > limit:
            raise DataError(_too_long(f"{expected / file_rate:.0f} s (its header says)"), path=path, field=field)
        # Only converts the sample format (int16, planar float, ...) to packed float; rate and layout are kept.
        # Packed, not planar: PyAV 18 crashes the process on a planar frame of more than 8 channels.
        converter = av.AudioResampler(format="flt")
        chunks, count = [], 0
        try:
            for frame in container.decode(stream):
                count += frame.samples  # where the header lied or said nothing: counted before converting
                if count > limit:
                    raise DataError(_too_long(f"more than {MAX_AUDIO_SECONDS:g} s"), path=path, field=field)
                for converted in converter.resample(frame):
                    chunks.append(_mono(converted))
            for converted in converter.resample(None):
                chunks.append(_mono(converted))
        except DataError:
            raise
        except (av.FFmpegError, ValueError) as error:  # ValueError: the format or layout changes mid-stream
            raise DataError(f"cannot decode audio: {error}", path=path, field=field) from error
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if audio.shape[0] == 0:
        raise DataError("audio has no samples", path=path, field=field)
    # Encoders pad or prime by up to a frame or two (AAC: 1024 samples), so allow that much slack.
    if expected is not None and audio.shape[0] < 0.99 * expected - 2048:
        raise DataError(
            f"audio is truncated: decoded {audio.shape[0]} of {int(expected)} samples", path=path, field=field
        )
    if not np.isfinite(audio).all():
        raise DataError("audio contains NaN or infinity", path=path, field=field)
    peak = float(np.abs(audio).max())
    if peak > MAX_PEAK:
        raise DataError(f"audio peaks at {peak:.3g}, far outside [-1, 1]", path=path, field=field)
    if peak < SILENCE_PEAK:
        raise DataError(f"audio is silent (peak below {SILENCE_PEAK})", path=path, field=field)
    if file_rate != sample_rate:
        audio = _soxr(audio, file_rate, sample_rate)
    return audio


def _too_long(found: str) -> str:
    return (f"audio lasts {found}, above the limit of {MAX_AUDIO_SECONDS:g} s (media.MAX_AUDIO_SECONDS): "
            "cut it into clips")


def _mono(frame: av.AudioFrame) -> np.ndarray:
    """A packed frame's samples ``[1, S * C]`` (channels interleaved) averaged to mono ``[S]``."""
    return frame.to_ndarray().reshape(frame.samples, -1).mean(axis=1)


def _soxr(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    return np.asarray(soxr.resample(audio, from_rate, to_rate), dtype=np.float32)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample mono audio with soxr (high quality).

    Args:
        audio (np.ndarray): ``[S]`` float samples.
        from_rate (int): the rate of ``audio`` in Hz.
        to_rate (int): the wanted rate in Hz.

    Returns:
        np.ndarray: float32 ``[round(S * to_rate / from_rate)]``.
    """
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio [S], got shape {audio.shape}")
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} and {to_rate}")
    if from_rate == to_rate:
        return audio.copy()
    return _soxr(audio, from_rate, to_rate)


def video_codec() -> str:
    """The mp4 video encoder to use: H.264 (libx264) where this PyAV build has it, else MPEG-4 part 2."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    crf: int = VIDEO_CRF,
    preset: str = "medium",
) -> None:
    """Write frames (and optionally a mono audio track) to an mp4, atomically.

    H.264 yuv420p at CRF 10 so that the file plays everywhere and decodes close to the input; MPEG-4 part 2 at a
    high bit rate where the PyAV build lacks libx264. The audio track is AAC.

    Args:
        path (str | Path): the mp4 to write; its folder must exist.
        frames (np.ndarray): uint8 ``[T, H, W, 3]`` RGB, H and W even (yuv420p halves the chroma resolution).
        fps (float): frames per second.
        audio (np.ndarray | None): float ``[S]`` in [-1, 1], or None for a silent file.
        sample_rate (int): the rate of ``audio`` in Hz.
        crf (int): x264's constant rate factor (lower: closer to the input, bigger).
        preset (str): x264's speed preset (``veryfast`` encodes several times faster than ``medium``, a little
            bigger at the same quality).
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected uint8 frames [T, H, W, 3] with T > 0, got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even frame sizes, got {height}x{width}")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if audio is not None:
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim != 1 or audio.shape[0] == 0:
            raise ValueError(f"expected mono audio [S] with S > 0, got shape {audio.shape}")
        audio = np.clip(audio, -1.0, 1.0)

    rate = Fraction(fps).limit_denominator(100000)
    codec = video_codec()
    tmp = temp_path(path)
    try:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            if codec == "libx264":
                # mbtree off: with it, x264's SIMD code made tiny frames encode differently from call to call (bytes
                # and pixels; asm=0 also cured it). One thread, so that the output is reproducible.
                options = {"crf": str(crf), "preset": preset, "threads": "1", "x264-params": "mbtree=0"}
                video = container.add_stream(codec, rate=rate, options=options)
            else:
                video = container.add_stream(codec, rate=rate)
                video.bit_rate = max(2_000_000, int(4 * width * height * float(rate)))  # 4 bits per pixel
            video.width = width
            video.height = height
            video.pix_fmt = "yuv420p"
            sound = None
            if audio is not None:
                sound = container.add_stream("aac", rate=sample_rate, layout="mono")
                sound.bit_rate = 96_000

            # Audio is fed frame by frame alongside the video so that the muxer can interleave the two tracks.
            audio_done = 0
            for index, image in enumerate(frames):
                # Converted here, not by the encoder, whose conversion uses its own thread count.
                frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format=video.pix_fmt,
                                                                                   **ONE_THREAD_SCALING)
                frame.pts = index
                frame.time_base = 1 / rate
                container.mux(video.encode(frame))
                if sound is not None:
                    audio_end = int((index + 1) * sample_rate / rate)
                    audio_end = len(audio) if index == len(frames) - 1 else min(audio_end, len(audio))
                    if audio_end > audio_done:
                        container.mux(sound.encode(_audio_frame(audio[audio_done:audio_end], audio_done, sample_rate)))
                        audio_done = audio_end
            container.mux(video.encode(None))
            if sound is not None:
                container.mux(sound.encode(None))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_clips(folder: str | Path, video, ids: list[str], fps: float, audio=None,
                sample_rate: int = 16000) -> list[Path]:
    """Write a batch of videos as ``{folder}/{id}.mp4``, each with its audio track. Ids become file names through
    :func:`prefalign.files.safe_name` (one file per id, always inside ``folder``); ids repeated in the batch are
    refused.

    Args:
        folder (str | Path): created if missing.
        video (torch.Tensor): ``[B, T, 3, H, W]`` in [0, 1].
        ids (list[str]): a clip id per video.
        fps (float): frames per second.
        audio (torch.Tensor | None): ``[B, S]`` at ``sample_rate``, cut to the frames' duration.
        sample_rate (int): the audio's rate.

    Returns:
        list[Path]: the file each video went to, in the order of ``ids``.
    """
    folder = Path(folder)
    names = unique_files([str(clip_id) for clip_id in ids], what="clips")
    folder.mkdir(parents=True, exist_ok=True)
    paths = [inside(folder, f"{name}.mp4") for name in names]
    frames = (video.permute(0, 1, 3, 4, 2).float().cpu() * 255).round().byte().numpy()
    samples = round(frames.shape[1] * sample_rate / fps)
    for index, path in enumerate(paths):
        track = None if audio is None else audio[index, :samples].float().cpu().numpy()
        write_video(path, frames[index], fps, audio=track, sample_rate=sample_rate)
    return paths


def _audio_frame(samples: np.ndarray, start: int, sample_rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[None, :]), format="fltp", layout="mono")
    frame.sample_rate = sample_rate
    frame.pts = start
    frame.time_base = Fraction(1, sample_rate)
    return frame


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int) -> None:
    """Write mono audio as 16-bit PCM wav, atomically.

    Args:
        path (str | Path): the wav to write.
        audio (np.ndarray): float ``[S]``; values outside [-1, 1] are clipped.
        sample_rate (int): in Hz.
    """
    path = Path(path)
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio [S], got shape {audio.shape}")
    # Scale by 32768 as FFmpeg does when it decodes, so that a write-read round trip is exact to half a step.
    pcm = np.clip(np.round(audio.astype(np.float64) * 32768.0), -32768, 32767).astype("<i2")
    tmp = temp_path(path)
    try:
        with wave.open(str(tmp), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(int(sample_rate))
            out.writeframes(pcm.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_image(path: str | Path, field: str = "reference", max_pixels: int = MAX_FRAME_PIXELS) -> np.ndarray:
    """Read an image as uint8 ``[H, W, 3]`` RGB (alpha dropped, greyscale expanded, 16-bit scaled to 8).

    Args:
        path (str | Path): an image file (png, jpeg, webp, gif, tiff, ...: what PIL reads).
        field (str): the manifest field named in errors.
        max_pixels (int): an image of more pixels than this is an error, judged from its header before decoding
            (``MAX_FRAME_PIXELS``).

    Raises:
        DataError: missing file, not an image PIL can decode, more than ``max_pixels`` pixels (a decompression bomb:
            a small file that decodes to gigabytes), or 32-bit integer or floating-point pixels that are not 8-bit
            levels (fractions in [0, 1], values outside [0, 255]).
    """
    check_file(path, field)
    try:
        with warnings.catch_warnings():
            # PIL warns from 89 MP and raises from 179 MP; our own, lower limit is checked just below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise DataError(f"image is too large to decode ({error})", path=path, field=field) from None
    except Exception as error:  # see below
        raise DataError(f"cannot read image ({type(error).__name__}: {error})", path=path, field=field) from error
    with image:
        # PIL opens lazily: the size comes from the header, and nothing is decoded until convert() below.
        width, height = image.size
        if width * height > max_pixels:
            raise DataError(
                f"image is {width}x{height} ({width * height} pixels), above the limit of {max_pixels} "
                "(data.max_frame_pixels, default media.MAX_FRAME_PIXELS)",
                path=path,
                field=field,
            )
        try:
            if image.mode in ("I", "F"):  # 32-bit: read as 8-bit levels, as convert() would, where that is exact
                return _levels(np.asarray(image), image.mode, path, field)
            if image.mode.startswith("I;16"):  # 16-bit greyscale: convert() would clip it to 255, not scale it
                grey = np.round(np.asarray(image, dtype=np.float32) / 257.0).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
        except DataError:
            raise
        # Any error: besides OSError, PIL's decoders raise what their parsing hits on a damaged file (TypeError from
        # a TIFF tag, SyntaxError, ...).
        except Exception as error:
            raise DataError(f"cannot read image ({type(error).__name__}: {error})", path=path, field=field) from error


def _levels(values: np.ndarray, mode: str, path, field: str) -> np.ndarray:
    """A 32-bit greyscale image (PIL mode ``I`` or ``F``) as uint8 RGB, where its values are 8-bit levels; values
    outside [0, 255] (which convert() would clip) or fractions in [0, 1] (which it would turn black) are refused."""
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    fractions = mode == "F" and high <= 1 and not np.array_equal(values, np.round(values))
    if not (np.isfinite(low) and np.isfinite(high)) or low < 0 or high > 255 or fractions:
        kind = "integer" if mode == "I" else "floating-point"
        raise DataError(f"32-bit {kind} pixels over [{low:g}, {high:g}], not 8-bit levels in [0, 255]: save the image "
                        "as 8-bit RGB", path=path, field=field)
    return np.repeat(np.round(values).astype(np.uint8)[:, :, None], 3, axis=2)


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8 ``[H, W, 3]`` RGB image as png, atomically."""
    path = Path(path)
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    tmp = temp_path(path)
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
