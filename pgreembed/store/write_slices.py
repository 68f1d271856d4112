"""How many rows one write transaction of a batch may take, so the app's rows are held
briefly.

A batch's write locks its rows until it commits (store.rows.lock_free_rows), and an app
transaction that edits one of them waits that long. Unindexed, or with HOT updates, a
row's write costs tens of microseconds and a batch of 512 commits in a few ms. Through
an HNSW index that is not so: a non-HOT update files the row's vector in the graph (a
search per row, 1-5 ms), and a whole batch held its rows for seconds (the app's edits'
p99 was 739 ms, max 2.3 s, during a migration's fill of a 30k-row HNSW table in
bench.scale_cycle). So a batch writes in slices, each in its own transaction, sized by
the time per row measured on this worker process's earlier slices of the same column.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TypeVar

from pgreembed.store.rows import Written
from pgreembed.store.slots import Slot

Item = TypeVar("Item")

# Rows of the first slice a process writes into a column: enough for a fair measure,
# few enough that a slow column holds them briefly.
PROBE_ROWS = 8


class WriteSlicer:
    """Per column (slot id and column name), the measured seconds per row written, and
    the slice that fits `budget_seconds` at that pace."""

    def __init__(self, budget_seconds: float, probe_rows: int = PROBE_ROWS) -> None:
        self.budget_seconds = budget_seconds
        self.probe_rows = probe_rows
        self._per_row: dict[tuple[int, str], float] = {}
        self._measured: dict[tuple[int, str], int] = {}  # most rows a slice was measured on
        self._lock = threading.Lock()

    def size(self, column: tuple[int, str]) -> int:
        """Rows the next slice of `column` may take (at least 1): what fits the budget at
        the measured pace, at most twice the most rows it was measured on (a pace measured
        on a few rows is not trusted with a whole batch)."""
        with self._lock:
            per_row = self._per_row.get(column)
            measured = self._measured.get(column, 0)
        if per_row is None:
            return self.probe_rows
        return max(1, min(int(self.budget_seconds / per_row), 2 * measured))

    def take(self, column: tuple[int, str], items: Sequence[Item]
             ) -> tuple[list[Item], list[Item]]:
        """(the next slice of `items`, the rest)."""
        size = self.size(column)
        return list(items[:size]), list(items[size:])

    def observe(self, column: tuple[int, str], rows: int, seconds: float) -> None:
        """A slice wrote `rows` rows in `seconds` (none: nothing learnt)."""
        if rows <= 0:
            return
        measured = max(seconds, 1e-6) / rows
        with self._lock:
            before = self._per_row.get(column)
            # Half the weight on the newest slice: an index that grows, or an app that
            # gets busy, shows within a few slices.
            self._per_row[column] = measured if before is None else (before + measured) / 2
            # The most rows the pace was measured on: a batch's small remainder slice
            # must not cut the next batch back to twice its size.
            self._measured[column] = max(rows, self._measured.get(column, 0))


def column_of(slot: Slot) -> tuple[int, str]:
    """What a slicer measures its pace per: the slot and the column its vectors go to now
    (a swap renames it, and the other column's pace is another)."""
    return slot.id, slot.vector_column


def slice_cost(written: Written) -> int:
    """Rows a slice's time was spent on: written or refused by the table (a row skipped,
    held by the app or changed meanwhile, costs next to nothing)."""
    return len(written.keys) + len(written.refused)
