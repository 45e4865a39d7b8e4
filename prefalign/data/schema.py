"""The clip schema: manifests (jsonl, json, parquet, csv or a Hub dataset) read with HF ``datasets``, and their columns.

A row names ``video`` (mp4 with its audio), optional ``audio`` (else the video's track), optional ``reference``
image (else the video's first frame), optional ``pose`` (keypoints per frame, .npy or .json), optional ``text``;
preference pairs add ``rejected``. Relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prefalign.data.errors import DataError

#: Columns a manifest may carry; any other column is passed through untouched.
MEDIA_COLUMNS = ("video", "audio", "reference", "pose", "rejected")
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Manifest:
    """Rows of one manifest and where their relative paths start."""

    source: str
    rows: list[dict]
    root: Optional[Path]

    @property
    def columns(self) -> set[str]:
        return set(self.rows[0]) if self.rows else set()

    def resolve(self, value: str) -> str:
        """A media path of a row, made absolute against the manifest's folder."""
        path = Path(value)
        if self.root is None or path.is_absolute() or "://" in value:
            return value
        return str(self.root / path)

    def fields(self, partial: bool = False) -> set[str]:
        """The batch fields this manifest can provide, counting those derived from the video.

        Args:
            partial (bool): also count the columns only some rows fill (for a data module that skips, and counts,
                the rows without them); else only those every row fills.
        """
        # Only columns every row fills by default: the rows without one would be bad samples.
        columns = {c for row in self.rows for c in row} if partial else self.columns
        fill = any if partial else all
        fields = {c for c in columns if fill(row.get(c) is not None for row in self.rows)}
        if "video" in fields:
            fields |= {"audio", "reference"}
        return fields


def load_manifest(source: str, split: str = "train") -> Manifest:
    """Read a manifest: a local jsonl/json/parquet/csv file, or a Hub dataset id (read from the local cache
    when offline). Every row must name a ``video``, or an ``audio`` and a ``reference`` (conditions to predict)."""
    import datasets

    path = Path(source)
    if path.suffix in LOCAL_FORMATS:
        if not path.is_file():
            raise DataError("manifest is not a regular file" if path.exists() else "manifest not found", path=source)
        if LOCAL_FORMATS[path.suffix] == "json":
            _check_json_rows(path, source)
        try:
            table = datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
            rows = table.to_list()  # pyarrow checks UTF-8 only here
        except Exception as error:  # datasets wraps parser errors in several types
            raise DataError(f"cannot parse the manifest ({_describe(error)})", path=source) from None
        root: Optional[Path] = path.resolve().parent
    elif path.exists():
        raise DataError(f"unknown manifest format '{path.suffix}' (use one of {sorted(LOCAL_FORMATS)})", path=source)
    else:
        try:
            rows = datasets.load_dataset(source, split=split).to_list()
        except Exception as error:
            raise DataError(f"cannot load the dataset ({type(error).__name__}: {error})", path=source) from None
        root = None
    if not rows:
        raise DataError("the manifest has no rows", path=source)
    for index, row in enumerate(rows):
        has_video = row.get("video") is not None
        if not has_video and (row.get("audio") is None or row.get("reference") is None):
            missing = "video" if "video" not in row else "video' (or 'audio' and 'reference"
            raise DataError(f"row {index} has no '{missing}'", path=source, field="video")
        for column in MEDIA_COLUMNS:
            value = row.get(column)
            if value is not None and not isinstance(value, str):
                raise DataError(f"row {index}: expected a file path, got {type(value).__name__}", path=source, field=column)
            if value is not None and not value.strip():
                # An empty path would resolve to the manifest's folder, or silently drop an optional file.
                raise DataError(f"row {index}: an empty path (leave the column out)", path=source, field=column)
    return Manifest(source=source, rows=rows, root=root)


def _check_json_rows(path: Path, source: str) -> None:
    """Every row of a json/jsonl manifest must be a non-empty JSON object. Checked before ``datasets`` reads the file:
    pyarrow's JSON reader under it crashes the whole process on some such files (a line ``null`` segfaults pyarrow
    26), and reports others as a generic "no data"."""
    data = path.read_bytes()  # small next to the rows that ``to_list`` makes of it
    try:
        document = json.loads(data)
        documents = document if isinstance(document, list) else [document]
        rows = [(f"row {index}", row) for index, row in enumerate(documents)]
    except ValueError:  # not one JSON document: JSON Lines
        rows = []
        for number, line in enumerate(data.splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"line {number}", json.loads(line)))
                except ValueError as error:  # invalid JSON, or not UTF-8
                    raise DataError(f"line {number} is not valid JSON ({error})", path=source) from None
    if not rows:
        raise DataError("the manifest has no rows", path=source)
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where} is a JSON {_json_kind(row)}, not an object (a row)", path=source)
        if not row:
            raise DataError(f"{where} is an empty object", path=source)


def _json_kind(value) -> str:
    kinds = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _describe(error: BaseException) -> str:
    """An error and its innermost cause: ``datasets`` wraps parser errors in a generic DatasetGenerationError."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    text = f"{type(error).__name__}: {error}"
    return text if cause is error else f"{text}; caused by {type(cause).__name__}: {cause}"
