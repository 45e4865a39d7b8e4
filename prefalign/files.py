"""Atomic file writes: whatever prefalign writes (checkpoint exports, adapters, caches, tables) is either the old
file or the whole new one, never half of it after a crash."""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path(path: Path) -> Path:
    """A hidden temporary name next to ``path``: same folder, so that ``os.replace`` is a rename, not a copy."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """``with atomic_write(out) as tmp: save(tmp)``: write to ``tmp``; on success it is flushed to disk and renamed
    to ``out``; on any error it is removed and ``out`` is left as it was."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def safe_name(name: str) -> str:
    """A clip id as a file name: characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_`` (an id
    such as ``speaker/clip 3`` must not reach into other folders or fail at the end of an evaluation)."""
    cleaned = re.sub(r"[^\w.-]", "_", name).lstrip(".")
    return cleaned or "_"
