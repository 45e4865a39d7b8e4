"""Bad samples under ``on_bad_sample: skip``: the record a bad sample becomes, its stand-in, and the epoch's summary."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional, Union

from prefalign.data.errors import DataError
from prefalign.secrets import get_logger

log = get_logger(__name__)


@dataclass
class Skipped:
    """What a bad sample becomes under ``on_bad_sample: skip``: the collate counts it, training logs it."""

    id: str
    shard: str
    """The manifest (or cache shard) the sample came from: skips are summed per shard at the end of an epoch."""
    path: Optional[str]
    field: Optional[str]
    reason: str


#: How many following samples a bad one's stand-in is looked for among (see :func:`load_or_stand_in`).
STAND_IN_TRIES = 16


def load_or_stand_in(index: int, size: int, load: Callable[[int], dict], skipped: Callable[[int, DataError], Skipped],
                     skip: bool) -> Union[dict, Skipped]:
    """Sample ``index`` through ``load``. A bad one raises under ``raise``; under ``skip`` it is logged and replaced
    by the next sample that loads, which carries the bad one's :class:`Skipped` record (``skipped_samples``) for the
    collate to count. Batches so keep their size: under DDP a rank with an empty batch would skip its backward and
    stall the others at the gradient all-reduce. Only when none of the next ``STAND_IN_TRIES`` loads either is the
    record returned alone (the collate drops it)."""
    try:
        return load(index)
    except DataError as error:
        if not skip:
            raise
        log.warning("skipping a bad sample: %s", error)
        record = skipped(index, error)
    for offset in range(1, min(size, STAND_IN_TRIES + 1)):
        try:
            item = load((index + offset) % size)
        except DataError:
            continue  # counted when its own turn comes
        return {**item, "skipped_samples": [record]}
    return record


class SkipSummary:
    """Skipped samples of an epoch, by shard (manifest or cache shard) and reason: what ``on_bad_sample: skip``
    dropped, reported at the end of each epoch."""

    def __init__(self):
        self.by_shard: Counter = Counter()
        self.reasons: dict[str, Counter] = {}
        self.unknown = 0

    def add(self, batch: dict) -> None:
        records = batch.get("skipped_samples", [])
        for record in records:
            self.by_shard[record.shard] += 1
            reason = f"{record.field or 'row'}: {record.reason}"
            self.reasons.setdefault(record.shard, Counter())[reason] += 1
        self.unknown += int(batch.get("skipped", 0)) - len(records)

    @property
    def total(self) -> int:
        return sum(self.by_shard.values()) + self.unknown

    def report(self, title: str) -> str:
        """One line per shard with its count and most common reasons."""
        lines = [f"{title}: {self.total} samples skipped"]
        for shard, count in self.by_shard.most_common():
            common = "; ".join(f"{n}x {reason}" for reason, n in self.reasons[shard].most_common(3))
            lines.append(f"  {shard}: {count} ({common})")
        return "\n".join(lines)
