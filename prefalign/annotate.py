"""``prefalign annotate``: a local web page on which a person judges preference pairs (two videos of the same
reference and speech, side by side with their sound); every answer is appended durably to a judgements file in the
format ``prefalign labels`` reads.

Why a page served by the standard library and not Gradio: the page needs exact control over two ``<video>``
elements (play, pause and seek together, from the same instant), over keyboard shortcuts and over when "saved" is
shown (only after the answer is on disk); that is a few hundred lines of plain JavaScript, while Gradio would add a
large dependency tree and its own state and queueing between the click and the file. ``http.server`` also keeps what the
browser may ask for small and explicit: pages, three JSON routes and the videos of the pairs file, by pair index.
"""

from __future__ import annotations

import concurrent.futures
import getpass
import hashlib
import json
import os
import re
import socket
import sys
import threading
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlsplit

import av

from prefalign.data import media
from prefalign.data.errors import DataError
from prefalign.files import _fsync_folder  # the one fsync of a folder's entries, shared with atomic_write
from prefalign.pairs import ASPECTS

MAX_LINE_BYTES = 64 * 1024
"""A pairs-file line longer than this is refused: a pair row is a few hundred bytes; megabytes on one line are a
mistake (or a file that is not a pairs manifest)."""

MAX_PAIRS = 100_000
"""Pairs per file above which the file is refused (a person judges hundreds to a few thousand)."""

MAX_POST_BYTES = 16 * 1024
"""The largest answer the server reads; an answer is well under 1 KiB."""

BROWSER_VIDEO_CODECS = ("h264", "vp8", "vp9", "av1")
"""Video codecs every current browser plays in an mp4/webm; anything else (mpeg4 part 2, hevc, prores) may show
a black box, so it is refused at start rather than judged blind."""

BROWSER_AUDIO_CODECS = ("aac", "mp3", "opus", "vorbis", "flac")
"""Audio codecs browsers play inside an mp4/webm."""

AUDIO_TYPES = {".wav": "audio/wav", ".mp3": "audio/mpeg", ".m4a": "audio/mp4", ".aac": "audio/aac",
               ".ogg": "audio/ogg", ".opus": "audio/ogg", ".flac": "audio/flac", ".webm": "audio/webm"}
"""Separate speech files the page can play (used only for pairs whose videos have no sound track)."""

VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/mp4", ".webm": "video/webm"}

CONDITIONS = ("audio", "reference", "pose", "text")
"""Columns copied from a pair into its judgement rows, so that ``prefalign labels`` writes trainable pairs."""

CHOICES = {"left", "right", "tie"}
"""What the page sends per aspect: the annotator sees sides, never which video is the pair's ``video``."""

SIDES = ("left", "right")
RESERVED = {"overall", "id", "video_a", "video_b", "annotator", "time", "order", "labels", *CONDITIONS}
"""Names of judgement-row columns that an aspect may not take."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Pair:
    """One pair to judge, checked at start; its files are resolved, inside the pairs file's folder."""

    index: int
    """Position in the pairs file (0-based); the page and the media URLs name a pair by it."""
    id: str
    """The pair's ``id``: what judgement rows and resume match on."""
    line: int
    """Line of the pairs file (1-based), for errors."""
    videos: dict[str, Path]
    """``{"a": the pair's video, "b": its rejected video}``, resolved."""
    speech: Optional[Path]
    """The row's ``audio`` file when a video has no sound track (the page plays it with both); else None."""
    conditions: dict[str, str]
    """``audio``/``reference``/``pose`` as absolute paths and ``text``, where the row has them."""


def _pair_error(pairs_path: str | Path, line: int, message: str, field: Optional[str] = None) -> DataError:
    return DataError(f"line {line}: {message}", path=pairs_path, field=field)


def _read_pair_rows(pairs_path: Path) -> list[tuple[int, dict]]:
    """The rows of the pairs manifest with their line numbers, refusing lines over ``MAX_LINE_BYTES``, more than
    ``MAX_PAIRS`` rows, text that is not UTF-8 and lines that are not JSON objects (each error names the line)."""
    try:
        media.check_file(pairs_path, "pairs")  # before opening: a fifo would block the reader forever
        handle = open(pairs_path, "rb")
    except DataError as error:
        raise DataError(f"the pairs manifest: {error.message}", path=pairs_path) from None
    except OSError as error:
        raise DataError(f"cannot read the pairs manifest ({error})", path=pairs_path) from None
    rows = []
    with handle:
        number = 0
        while True:
            line = handle.readline(MAX_LINE_BYTES + 1)
            if not line:
                break
            number += 1
            if len(line) > MAX_LINE_BYTES:
                raise _pair_error(pairs_path, number, f"longer than {MAX_LINE_BYTES} bytes: not a pair row")
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise _pair_error(pairs_path, number, f"not UTF-8 text ({error})") from None
            except ValueError as error:
                raise _pair_error(pairs_path, number, f"not valid JSON ({error})") from None
            if not isinstance(row, dict):
                raise _pair_error(pairs_path, number, f"a JSON {type(row).__name__}, not an object (a row)")
            rows.append((number, row))
            if len(rows) > MAX_PAIRS:
                raise _pair_error(pairs_path, number, f"more than {MAX_PAIRS} pairs: split the file")
    if not rows:
        raise DataError("the pairs manifest has no rows", path=pairs_path)
    return rows


def _inside_folder(root: Path, value: object, pairs_path: Path, line: int, field: str) -> Path:
    """A row's file path, resolved (``..`` and symlinks) against the pairs file's folder; refused unless a non-empty
    string that stays inside that folder: the server never serves a file the pairs file's folder does not hold."""
    if not isinstance(value, str) or not value.strip():
        raise _pair_error(pairs_path, line, f"'{field}' must be a file path (a non-empty string), got "
                          f"{json.dumps(value)[:80]}", field)
    if "\x00" in value:
        raise _pair_error(pairs_path, line, f"'{field}' holds a NUL byte", field)
    try:
        resolved = (root / value).resolve()  # an absolute value replaces root
    except (OSError, RuntimeError) as error:  # a symlink loop
        raise _pair_error(pairs_path, line, f"'{field}' ({value}) cannot be resolved ({error})", field) from None
    if resolved != root and root not in resolved.parents:
        raise _pair_error(pairs_path, line, f"'{field}' ({value}) resolves to {resolved}, outside the pairs file's "
                          f"folder {root}: annotate serves only files inside it", field)
    try:
        media.check_file(resolved, field)
    except DataError as error:
        raise _pair_error(pairs_path, line, f"'{field}' ({value}): {error.message}", field) from None
    return resolved


def _probe_video(path: Path, pairs_path: Path, line: int, field: str) -> bool:
    """Check that ``path`` is a video a browser plays: it opens, has a video stream in a browser codec and its first
    frame decodes. Returns whether it has a sound track (in a codec browsers play)."""
    def fail(message: str) -> DataError:
        return _pair_error(pairs_path, line, f"'{field}' ({path}): {message}", field)

    if path.suffix.lower() not in VIDEO_TYPES:
        raise fail(f"not a video file browsers play (use one of {sorted(VIDEO_TYPES)})")
    try:
        with av.open(os.fspath(path), mode="r", metadata_errors="replace") as container:
            if not container.streams.video:
                raise fail("has no video stream")
            stream = container.streams.video[0]
            codec = stream.codec_context.name if stream.codec_context is not None else None
            if codec not in BROWSER_VIDEO_CODECS:
                raise fail(f"video codec {codec} does not play in browsers; re-encode it as H.264, e.g. "
                           "ffmpeg -i in.mp4 -c:v libx264 -pix_fmt yuv420p -c:a aac out.mp4")
            pixels = (stream.codec_context.width or 0) * (stream.codec_context.height or 0)
            if pixels > media.MAX_FRAME_PIXELS:  # checked from the header, before a frame is decoded
                raise fail(f"frames of {stream.codec_context.width}x{stream.codec_context.height} exceed "
                           f"{media.MAX_FRAME_PIXELS} pixels; scale the video down")
            if next(container.decode(stream), None) is None:
                raise fail("no video frame decodes")
            sound = container.streams.audio
            if sound and (sound[0].codec_context is None or sound[0].codec_context.name not in BROWSER_AUDIO_CODECS):
                name = sound[0].codec_context.name if sound[0].codec_context is not None else "unknown"
                raise fail(f"audio codec {name} does not play in browsers; re-encode the sound as AAC")
            return bool(sound)
    except av.FFmpegError as error:
        raise fail(f"not a readable video ({error})") from None


def _probe_speech(path: Path, pairs_path: Path, line: int) -> None:
    """Check that a separate speech file is one the page can play and holds an audio stream."""
    if path.suffix.lower() not in AUDIO_TYPES:
        raise _pair_error(pairs_path, line, f"'audio' ({path}): not an audio file browsers play (use one of "
                          f"{sorted(AUDIO_TYPES)})", "audio")
    try:
        with av.open(os.fspath(path), mode="r", metadata_errors="replace") as container:
            if not container.streams.audio:
                raise _pair_error(pairs_path, line, f"'audio' ({path}): has no audio stream", "audio")
    except av.FFmpegError as error:
        raise _pair_error(pairs_path, line, f"'audio' ({path}): not a readable audio file ({error})", "audio") from None


def _check_pair(index: int, line: int, row: dict, root: Path, pairs_path: Path) -> Pair:
    pair_id = row.get("id")
    if pair_id is None:
        raise _pair_error(pairs_path, line, "no 'id': annotate matches answers to pairs by id (to resume)", "id")
    if isinstance(pair_id, bool) or not isinstance(pair_id, (str, int)) or str(pair_id) == "":
        raise _pair_error(pairs_path, line, f"'id' must be a non-empty string or an integer, got "
                          f"{json.dumps(pair_id)[:80]}", "id")
    videos, sound = {}, {}
    for letter, field in (("a", "video"), ("b", "rejected")):
        if row.get(field) is None:
            raise _pair_error(pairs_path, line, f"no '{field}': a pair names its two videos as 'video' and "
                              "'rejected'", field)
        videos[letter] = _inside_folder(root, row[field], pairs_path, line, field)
        sound[letter] = _probe_video(videos[letter], pairs_path, line, field)
    conditions = {}
    for column in CONDITIONS:
        value = row.get(column)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise _pair_error(pairs_path, line, f"'{column}' must be a non-empty string, got "
                              f"{json.dumps(value)[:80]}", column)
        conditions[column] = value if column == "text" or "://" in value else str(root / value)
    speech = None
    if not all(sound.values()):
        silent = [field for letter, field in (("a", "video"), ("b", "rejected")) if not sound[letter]]
        if row.get("audio") is None:
            raise _pair_error(pairs_path, line, f"'{silent[0]}' has no sound track and the row names no 'audio': "
                              "a pair is judged with its speech", silent[0])
        speech = _inside_folder(root, row["audio"], pairs_path, line, "audio")
        _probe_speech(speech, pairs_path, line)
    return Pair(index=index, id=str(pair_id), line=line, videos=videos, speech=speech, conditions=conditions)


def load_pairs(pairs: str | Path, workers: int = 4) -> list[Pair]:
    """Read and check a pairs manifest (``prefalign pairs`` or ``prefalign synth --rejected`` writes one).

    Each row needs a unique ``id`` and two videos, ``video`` and ``rejected``, relative to the manifest's folder (or
    absolute) and, once ``..`` and symlinks are resolved, inside that folder; each must exist and be a video a browser
    plays (its first frame is decoded). A video without a sound track needs the row's ``audio``, inside the folder too.
    The first bad row is a ``DataError`` naming the file, the line and the field.

    Args:
        pairs: the pairs manifest (jsonl).
        workers: threads that open the videos (PyAV decodes outside the GIL).
    """
    pairs_path = Path(pairs)
    numbered = _read_pair_rows(pairs_path)
    root = pairs_path.resolve().parent
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        # map yields in row order and raises the first failing row's error, so the first bad row is the one named.
        checked = list(pool.map(lambda item: _check_pair(item[0], item[1][0], item[1][1], root, pairs_path),
                                enumerate(numbered)))
    seen: dict[str, int] = {}
    for pair in checked:
        if pair.id in seen:
            raise _pair_error(pairs_path, pair.line, f"id {pair.id[:200]!r} is also the id of line {seen[pair.id]}: "
                              "ids must be unique", "id")
        seen[pair.id] = pair.line
    return checked


def display_order(annotator: str, pair_id: str) -> tuple[str, str]:
    """Which video (``a``: the pair's ``video``, ``b``: its ``rejected``) is shown left, which right.

    Drawn per pair from a hash of the annotator and the pair id: a coin flip for every pair (position bias is real),
    different between annotators, and the same on every reload and restart, so a resumed page shows what it showed.
    """
    digest = hashlib.sha256(f"{annotator}\n{pair_id}".encode("utf-8", "surrogatepass")).digest()
    return ("a", "b") if digest[0] % 2 == 0 else ("b", "a")


class JudgementLog:
    """The judgements file of one annotator: read once at start (resume), then appended to, one JSON line per
    answer, each flushed to disk (``fsync``) before :meth:`append` returns.

    The file is locked (``flock``) for as long as the log is open, so a second server on the same file is refused;
    the lock dies with the process, so a killed server leaves no stale lock. A last line cut short by a crash (no
    newline at its end and not whole JSON; never acknowledged, since the answer is acknowledged only after its whole
    line is on disk) is dropped with a warning; any other unreadable line is an error naming it: no complete answer
    is lost silently. A write that fails (a full disk) is cut off again, so the file always reads back.

    Args:
        path: the judgements file (jsonl), created if missing.
        pairs: the pairs being judged: every answer in the file must be for one of them, with the same videos.
        annotator: who answers; ``None`` takes the name the file already holds, else the login name.
    """

    def __init__(self, path: str | Path, pairs: list[Pair], annotator: Optional[str] = None):
        try:
            import fcntl
        except ImportError:  # Windows
            raise RuntimeError("prefalign annotate needs a POSIX system (file locks through fcntl)") from None
        self.path = Path(path)
        self.lock = threading.Lock()
        self.answers: dict[str, dict] = {}
        by_id = {pair.id: pair for pair in pairs}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RuntimeError(f"{self.path} is in use by another prefalign annotate: each annotator needs their "
                                   "own --out file (and one server per file)") from None
            if created:
                _fsync_folder(self.path.parent)  # the new file's name is on disk, not only its contents
            names = self._resume(by_id)
            if annotator is not None and names and names != {annotator}:
                raise DataError(f"holds answers by {sorted(names)}, not by {annotator!r}: each annotator writes their "
                                "own file (use another --out)", path=self.path, field="annotator")
            self.annotator = annotator or (names.pop() if names else _login_name())
        except BaseException:
            os.close(self.fd)
            raise

    def _resume(self, by_id: dict[str, Pair]) -> set[str]:
        """Load the answers already in the file (the last one per pair id wins); returns the annotator names."""
        data = b""
        while True:
            chunk = os.pread(self.fd, 1 << 20, len(data))
            if not chunk:
                break
            data += chunk
        complete, _, torn = data.rpartition(b"\n")
        unended = bool(torn.strip()) and _json_object(torn)  # a whole answer, its line end lost (an editor): kept
        if unended:
            complete, torn = data, b""
        if torn.strip() and not torn.startswith(b'{"id": '):  # how every answer line starts
            raise DataError(f"its last line has no line end and is not an answer cut short ({torn[:80]!r}): is "
                            "this a judgements file?", path=self.path)
        names = set()
        for number, line in enumerate(complete.split(b"\n") if complete else [], 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except ValueError as error:
                raise DataError(f"line {number} is not a JSON answer ({error}); fix or remove it",
                                path=self.path) from None
            pair = by_id.get(str(row.get("id"))) if isinstance(row, dict) else None
            if pair is None:
                raise DataError(f"line {number} answers a pair id that the pairs file does not hold "
                                f"({json.dumps(row.get('id') if isinstance(row, dict) else row)[:80]}): use one --out "
                                "file per pairs file", path=self.path, field="id")
            if (row.get("video_a"), row.get("video_b")) != (str(pair.videos["a"]), str(pair.videos["b"])):
                raise DataError(f"line {number} judged other videos for pair {pair.id!r} than the pairs file now names "
                                f"({row.get('video_a')}, {row.get('video_b')}): use a new --out file", path=self.path,
                                field="video_a")
            if isinstance(row.get("annotator"), str):
                names.add(row["annotator"])
            self.answers[pair.id] = row
        if unended:
            os.write(self.fd, b"\n")  # the next answer starts on a line of its own
            os.fsync(self.fd)
        if torn:  # only once the file has proved to be this annotator's judgements
            if torn.strip():
                warnings.warn(f"{self.path}: its last line was cut short (a crash while it was written) and is "
                              f"dropped: {torn[:120]!r}", stacklevel=3)
            os.ftruncate(self.fd, len(data) - len(torn))  # the next answer starts on a line of its own
            os.fsync(self.fd)
        return names

    def append(self, row: dict) -> None:
        """Append one answer and return only once it is on disk."""
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            if self.fd < 0:
                raise OSError("the judgements file is closed (the server is stopping)")
            size = os.fstat(self.fd).st_size
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self.fd, view)  # O_APPEND: always at the end, even after a truncation
                    view = view[written:]
                os.fsync(self.fd)
            except OSError:
                # A disk that filled mid-line: cut the part-line off, else the next (acknowledged) answer is glued to
                # it and the file no longer reads back.
                try:
                    os.ftruncate(self.fd, size)
                except OSError:
                    pass
                raise
            self.answers[row["id"]] = row

    def close(self) -> None:
        """Release the file (and its lock); an answer being written first ends."""
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def _json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except ValueError:  # UnicodeDecodeError too
        return False


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name (a container without a passwd entry)
        return "anonymous"


def _page(name: str) -> bytes:
    return resources.files("prefalign").joinpath(name).read_bytes()


class AnnotationServer(ThreadingHTTPServer):
    """The annotation app: the page, its JSON API and the pairs' videos, for one annotator and one judgements file.

    Args:
        pairs: the checked pairs (:func:`load_pairs`).
        log: the annotator's judgements file.
        aspects: what is judged per pair (each ``left``, ``right`` or ``tie``); ``overall`` is offered as optional.
        host: interface to listen on.
        port: port (0: any free one; :attr:`url` says which).
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, pairs: list[Pair], log: JudgementLog, aspects: list[str], host: str = "127.0.0.1",
                 port: int = 7860):
        self.pairs, self.log, self.aspects = pairs, log, list(aspects)
        self.pages = {"/": (_page("annotate_page.html"), "text/html; charset=utf-8"),
                      "/page.js": (_page("annotate_page.js"), "text/javascript; charset=utf-8")}
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), _Handler)
        self.host = host

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"

    def done(self) -> int:
        return len(self.log.answers)

    def next_unanswered(self, after: int) -> Optional[int]:
        """The first pair after ``after`` (wrapping around) without an answer; None when all are answered."""
        total = len(self.pairs)
        for step in range(1, total + 1):
            index = (after + step) % total
            if self.pairs[index].id not in self.log.answers:
                return index
        return None

    def pair_view(self, index: int) -> dict:
        """What the page needs to show pair ``index``: media URLs by side, and its saved answer in sides."""
        pair = self.pairs[index]
        order = display_order(self.log.annotator, pair.id)
        saved = self.log.answers.get(pair.id)
        answer = None
        if saved is not None:
            side = {order[0]: "left", order[1]: "right", "tie": "tie"}
            answer = {key: side[saved[key]] for key in [*self.aspects, "overall"] if saved.get(key) in side}
        return {
            "index": index, "id": pair.id, "total": len(self.pairs), "done": self.done(), "answer": answer,
            "media": {"left": f"/media/{index}/left", "right": f"/media/{index}/right",
                      "speech": f"/media/{index}/speech" if pair.speech is not None else None},
            "next": self.next_unanswered(index),
        }

    def record(self, body: dict) -> dict:
        """Validate an answer from the page, append it to the judgements file (on disk before this returns) and say
        what to show next. Raises ``ValueError`` with a message for the page on a bad answer."""
        if set(body) - {"index", "id", "choices"}:
            raise ValueError(f"unknown keys {sorted(set(body) - {'index', 'id', 'choices'})}")
        index, choices = body.get("index"), body.get("choices")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.pairs):
            raise ValueError("unknown pair index")
        pair = self.pairs[index]
        if body.get("id") != pair.id:
            raise ValueError("the pair id does not match this server's pairs file (reload the page)")
        if not isinstance(choices, dict) or set(choices) - {*self.aspects, "overall"}:
            raise ValueError(f"choices must be an object of {[*self.aspects, 'overall']}")
        missing = [aspect for aspect in self.aspects if aspect not in choices]
        if missing:
            raise ValueError(f"no answer for {missing}")
        if any(not isinstance(value, str) or value not in CHOICES for value in choices.values()):
            raise ValueError(f"each choice is one of {sorted(CHOICES)}")
        order = display_order(self.log.annotator, pair.id)
        letter = {"left": order[0], "right": order[1], "tie": "tie"}
        row = {"id": pair.id, "video_a": str(pair.videos["a"]), "video_b": str(pair.videos["b"]), **pair.conditions}
        row.update({key: letter[choices[key]] for key in [*self.aspects, "overall"] if key in choices})
        row.update({"annotator": self.log.annotator, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "order": list(order)})
        self.log.append(row)
        return {"saved": True, "id": pair.id, "done": self.done(), "total": len(self.pairs),
                "next": self.next_unanswered(index)}

    def server_close(self) -> None:
        super().server_close()
        self.log.close()


_MEDIA = re.compile(r"^/media/(\d{1,9})/(left|right|speech)$")
_PAIR = re.compile(r"^/api/pair/(\d{1,9})$")
_RANGE = re.compile(r"^bytes=(\d{0,18})-(\d{0,18})$")  # longer numbers: no file is that big; ignored
CHUNK = 256 * 1024


class _Handler(BaseHTTPRequestHandler):
    """Routes: ``/`` and ``/page.js`` (the page), ``GET /api/state``, ``GET /api/pair/<index>``,
    ``POST /api/answer`` and ``GET /media/<index>/<left|right|speech>`` (with HTTP ranges, which seeking needs).
    No route takes a path: files are named by pair index and side only."""

    server: AnnotationServer
    protocol_version = "HTTP/1.1"
    timeout = 60  # a client that stops sending mid-request frees its thread

    def version_string(self) -> str:
        return "prefalign-annotate"  # no Python version in the Server header

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass  # one line per video range request would bury the messages that matter

    def _headers(self, status: int, length: int, content_type: str, extra: Optional[dict] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
                         "media-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
                         "frame-ancestors 'none'")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self._headers(status, len(body), content_type)
        self.wfile.write(body)

    def _json(self, status: int, payload: dict) -> None:
        self._send(status, json.dumps(payload).encode("utf-8"), "application/json")

    def _host_allowed(self) -> bool:
        """On a loopback address, only requests naming a loopback host: a web page whose DNS name is rebound to
        127.0.0.1 must not read or write through the annotator's browser."""
        if self.server.host not in LOOPBACK:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        host = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0]  # [::1]:port, [::1]
        return host in LOOPBACK

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if not self._host_allowed():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        path = urlsplit(self.path).path
        if path in self.server.pages:
            return self._send(HTTPStatus.OK, *self.server.pages[path])
        if path == "/api/state":
            server = self.server
            return self._json(HTTPStatus.OK, {
                "annotator": server.log.annotator, "aspects": server.aspects, "total": len(server.pairs),
                "done": server.done(), "next": server.next_unanswered(len(server.pairs) - 1)})
        match = _PAIR.match(path)
        if match and int(match[1]) < len(self.server.pairs):
            return self._json(HTTPStatus.OK, self.server.pair_view(int(match[1])))
        match = _MEDIA.match(path)
        if match and int(match[1]) < len(self.server.pairs):
            return self._media(self.server.pairs[int(match[1])], match[2])
        return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        self.close_connection = True  # until the body is read: an unread body must not pass for the next request
        if not self._host_allowed():
            return self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
        if urlsplit(self.path).path != "/api/answer":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "not found"})
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            return self._json(HTTPStatus.FORBIDDEN, {"error": "cross-origin request"})
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            # A form on another site can post text/plain without asking; application/json needs a CORS preflight.
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send application/json"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._json(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
        if not 0 < length <= MAX_POST_BYTES:
            return self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"at most {MAX_POST_BYTES} bytes"})
        try:
            data = self.rfile.read(length)
            self.close_connection = False
            body = json.loads(data.decode("utf-8"))
            if not isinstance(body, dict):
                raise ValueError("the answer must be a JSON object")
            reply = self.server.record(body)
        except (ValueError, UnicodeDecodeError) as error:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        except OSError as error:  # disk full, I/O error: the page must not say saved
            print(f"annotate: could not save an answer: {error}", file=sys.stderr)
            return self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"not saved: {error}"})
        return self._json(HTTPStatus.OK, reply)

    def _media(self, pair: Pair, side: str) -> None:
        """Send a pair's video (or its speech), all of it or the one byte range asked for."""
        if side == "speech":
            if pair.speech is None:
                return self._json(HTTPStatus.NOT_FOUND, {"error": "this pair has no separate speech"})
            path, content_type = pair.speech, AUDIO_TYPES[pair.speech.suffix.lower()]
        else:
            order = display_order(self.server.log.annotator, pair.id)
            path = pair.videos[order[SIDES.index(side)]]
            content_type = VIDEO_TYPES[path.suffix.lower()]
        try:
            handle = open(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")
        except OSError as error:
            return self._json(HTTPStatus.NOT_FOUND, {"error": f"cannot open the file: {error.strerror}"})
        with handle:
            size = os.fstat(handle.fileno()).st_size
            start, end = 0, size - 1
            status, extra = HTTPStatus.OK, {"Accept-Ranges": "bytes"}
            match = _RANGE.match(self.headers.get("Range", "").strip())
            if match and (match[1] or match[2]):
                if match[1]:
                    start = int(match[1])
                    end = min(int(match[2]), size - 1) if match[2] else size - 1
                else:  # bytes=-N: the last N bytes
                    start = max(size - int(match[2]), 0)
                if start > end or start >= size:
                    self._headers(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, 0, content_type,
                                  {"Content-Range": f"bytes */{size}"})
                    return
                status = HTTPStatus.PARTIAL_CONTENT
                extra["Content-Range"] = f"bytes {start}-{end}/{size}"
            self._headers(status, end - start + 1, content_type, extra)
            handle.seek(start)
            left = end - start + 1
            try:
                while left > 0:
                    chunk = handle.read(min(CHUNK, left))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):  # the browser dropped a range it no longer needs
                self.close_connection = True


def _aspect_list(aspects: Union[list[str], str, None]) -> list[str]:
    if aspects is None:
        return list(ASPECTS)
    names = [name.strip() for name in aspects.split(",")] if isinstance(aspects, str) else list(aspects)
    for name in names:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", name or "") or name in RESERVED:
            raise ValueError(f"--aspects: {name!r} is not an aspect name (letters, digits and _; none of "
                             f"{sorted(RESERVED)})")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"--aspects must name distinct aspects, got {names}")
    return names


def open_server(pairs: str, out: str, annotator: Optional[str] = None, host: str = "127.0.0.1", port: int = 7860,
                aspects: Union[list[str], str, None] = None) -> AnnotationServer:
    """Check the pairs file, open (and lock) the judgements file and bind the server; nothing is served until
    ``serve_forever()``. The caller closes it with ``server_close()``."""
    names = _aspect_list(aspects)
    checked = load_pairs(pairs)
    if os.path.exists(out) and os.path.samefile(out, pairs):
        raise ValueError(f"--out {out} is the pairs file: answers go to a judgements file of their own")
    log = JudgementLog(out, checked, annotator)
    try:
        return AnnotationServer(checked, log, names, host=host, port=port)
    except BaseException:
        log.close()
        raise


def annotate(
    pairs: str,
    out: str,
    annotator: Optional[str] = None,
    port: int = 7860,
    host: str = "127.0.0.1",
    aspects: Union[list[str], str, None] = None,
) -> None:
    """Judge preference pairs in a browser: two videos side by side with their sound, played together.

    Serves a page (open the printed address) on which an annotator says, per aspect, which video is better (left,
    right or tie), plus an optional overall verdict. Left and right are drawn per pair and recorded. Every answer
    is appended to ``out`` and on disk before the page shows it saved; a restart resumes at the first unanswered pair.
    Run one server per annotator, each with their own ``out``; then ``prefalign labels --labels [a.jsonl,b.jsonl]``
    merges them and reports their agreement.

    Args:
        pairs: the pairs manifest (``prefalign pairs`` writes one): rows with ``id``, ``video`` and ``rejected``
            inside the manifest's folder. Checked whole before anything is served.
        out: the annotator's judgements file (jsonl, in the format ``prefalign labels`` reads); created if missing,
            resumed if not.
        annotator: the annotator's name, written in every answer (default: the name ``out`` holds, else the login).
        port: port to listen on (0: any free port).
        host: interface to listen on. The default serves this machine only; any other address serves the pairs'
            videos and takes answers from anyone who can reach it (there is no login).
        aspects: what is judged, comma-separated (default lip_sync,expression,motion: the aspects
            ``prefalign labels`` reads by default).
    """
    if host not in LOOPBACK:
        warnings.warn(f"--host {host}: the videos and the answer form are open to every machine that reaches this "
                      "address, with no login; use it only on a network you trust", stacklevel=2)
    server = open_server(pairs, out, annotator=annotator, host=host, port=port, aspects=aspects)
    try:
        print(f"annotate: {len(server.pairs)} pairs, {server.done()} answered by {server.log.annotator}, "
              f"saved to {out}; open {server.url}", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
