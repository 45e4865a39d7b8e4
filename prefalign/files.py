"""Where and how prefalign writes files: atomically (whatever it writes, checkpoints, exports, adapters, caches,
tables, is either the old file or the whole new one, never half of it after a crash), under names made from ids by
one function (:func:`safe_name`), and never outside the folder the user named (:func:`inside`)."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

#: The most UTF-8 bytes of a file-name stem made from an id, so that with a suffix (``_rejected.mp4``) and
#: :func:`temp_path`'s wrapping the file name stays far below the 255 bytes filesystems allow.
MAX_NAME_BYTES = 120
#: What an id may keep in a file name: letters, digits (any script), ``_``, ``.`` and ``-``.
_UNSAFE = re.compile(r"[^\w.-]")
#: What separates a changed name from the hash of the id it came from; never in a name kept as it was.
_HASH_MARK = "~"


def temp_path(path: Path) -> Path:
    """A hidden temporary name next to ``path``: same folder, so that ``os.replace`` is a rename, not a copy (a
    temporary file in ``$TMPDIR`` may sit on another filesystem, where the "rename" is a copy a crash can cut).
    The name never ends in ``.ckpt``, so no checkpoint search picks a temporary file left by a killed process."""
    return path.with_name(f".{_temp_stem(path.name)}.{os.getpid()}.tmp")


def _temp_stem(name: str) -> str:
    # A name near the 255-byte limit leaves no room for the wrapping: its temporary file goes by its hash.
    raw = name.encode("utf-8", "surrogatepass")
    return name if len(raw) <= 200 else hashlib.sha256(raw).hexdigest()


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (the rename is an entry of the folder, flushed with it)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # some filesystems cannot fsync a folder; the rename itself is still atomic
        pass
    finally:
        os.close(handle)


def remove_stale_temps(path: Path) -> int:
    """Remove temporary files that :func:`temp_path` made for ``path`` in processes that no longer run (a save
    SIGKILLed mid-write leaves one); returns how many. Those of a running process (on this machine) are kept."""
    removed = 0
    stem = _temp_stem(path.name)
    for stale in path.parent.glob(f".{glob.escape(stem)}.*.tmp"):
        pid = stale.name[len(stem) + 2 : -len(".tmp")]
        if not pid.isdigit() or int(pid) == os.getpid() or _running(int(pid)):
            continue
        try:
            stale.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """``with atomic_write(out) as tmp: save(tmp)``: write to ``tmp``; on success it is flushed to disk and renamed
    to ``out``; on any error it is removed and ``out`` is left as it was."""
    path = Path(path)
    tmp = temp_path(path)
    tmp.unlink(missing_ok=True)  # a leftover (or a planted symlink) must not be written through
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def safe_name(name: str) -> str:
    """The one way prefalign turns an id (or any user string) into a file name, one-to-one.

    An id made only of letters, digits (any script), ``_``, ``.`` and ``-``, not starting with ``.`` and at most
    :data:`MAX_NAME_BYTES` long is kept as it is. Any other id (``speaker/clip 3``, ``../../x``, ``/abs``, ``..``,
    an empty id, a NUL, a 10,000-character id) has those characters replaced by ``_``, leading dots dropped, is cut
    to fit, and gets ``~`` and a hash of the whole id appended: ``a/b`` becomes ``a_b~<hash>``, never ``a_b``, so
    that two ids never share a file. A name never holds a path separator, never is ``.`` or ``..`` and never
    reaches into another folder; use :func:`inside` to join it to its folder.
    """
    text = str(name)
    cleaned = _UNSAFE.sub("_", unicodedata.normalize("NFC", text)).lstrip(".")
    if cleaned == text and cleaned and len(cleaned.encode("utf-8")) <= MAX_NAME_BYTES:
        return cleaned
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    room = MAX_NAME_BYTES - len(_HASH_MARK) - len(digest)
    stem = cleaned.encode("utf-8")[:room].decode("utf-8", "ignore")
    return f"{stem or '_'}{_HASH_MARK}{digest}"


def inside(folder: str | Path, *names: str) -> Path:
    """``folder/name...``, refused unless it stays inside ``folder`` once ``..`` and symlinks are resolved (a
    name that is an absolute path, or a symlink in ``folder`` pointing elsewhere, would write outside it).

    Raises:
        ValueError: the path would leave ``folder``; the error names both.
    """
    root = Path(folder).resolve()
    path = Path(folder).joinpath(*names)
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        raise ValueError(f"refusing to write {path}: it resolves to {resolved}, outside the output folder {folder}")
    return path


def unique_files(ids: Sequence[str], what: str = "ids") -> list[str]:
    """:func:`safe_name` of each id; refuses ids that repeat (they would write one file twice), naming them."""
    seen: dict[str, int] = {}
    for index, clip_id in enumerate(ids):
        if str(clip_id) in seen:
            raise ValueError(f"{what} {seen[str(clip_id)]} and {index} are both {str(clip_id)[:200]!r}: each id names "
                             "its own output file, so ids must be unique")
        seen[str(clip_id)] = index
    return [safe_name(clip_id) for clip_id in ids]
