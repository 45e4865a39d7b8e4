"""The one error type for bad input: it names the file and the field that are wrong."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data, with the file and the manifest field (column) it came from.

    Args:
        message (str): what is wrong, in words a user can act on.
        path (str | Path | None): the file (or manifest) that holds the bad value.
        field (str | None): the manifest column or tensor field, e.g. ``"video"`` or ``"pose"``.
    """

    def __init__(self, message: str, path: str | Path | None = None, field: str | None = None):
        self.message = message
        self.path = None if path is None else str(path)
        self.field = field
        where = []
        if self.path is not None:
            where.append(self.path)
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


def require_fields(needed, available: set[str], source: str, who: str) -> None:
    """Fail at setup, not mid-epoch, when the data lacks a field ``who`` (e.g. "the DPO algorithm", "the
    denoiser") reads: a DataError naming the first missing field and what the data has."""
    for field in needed:
        if field not in available:
            raise DataError(
                f"{who} needs the field '{field}', which this dataset does not provide in every row "
                f"(it has: {', '.join(sorted(available)) or 'nothing'})",
                path=source,
                field=field,
            )
