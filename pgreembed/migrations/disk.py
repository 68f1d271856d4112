"""The disk a migration needs at its peak, and what stays after `finalize` (`migrate plan`).

Sizes are what pg_total_relation_size counts (heap + TOAST + indexes). From `start` to
`finalize` both columns exist: the new vectors and the new column's index come on top of
the table (the peak). `finalize` drops the old column's indexes (their files go at once)
and clears its vectors (migrations.clear): their space is free for the table's next
writes, and the next migration's fill, but a plain VACUUM returns only empty pages at the
end of a file to the operating system. So on disk the table stays about at its peak less
the old indexes, while its live data is back to about its size before (with the new
model's vectors instead of the old ones). Measured in tests/test_migration_space.py
(within 20%) and bench/migration_space.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.errors import ConfigError
from pgreembed.store.slots import Slot

PAGE = 8192
PAGE_ROOM = 8168  # a page less its header
TOAST_CHUNK = 1996  # data bytes per TOAST chunk (8 kB pages)
TOAST_CHUNK_OVERHEAD = 40  # tuple header + chunk id + seq + varlena header + line pointer
TOAST_INDEX_ENTRY = 24  # a chunk's entry in the TOAST table's index
TOAST_THRESHOLD = 2032  # a row above this has its largest values moved to TOAST
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class DiskEstimate:
    """Bytes of the app's table (heap + TOAST + indexes)."""

    now: int
    peak: int  # while both columns exist (fill to finalize)
    after_finalize: int  # on disk after finalize + VACUUM
    live_after_finalize: int  # of which the table's data (the rest is free for reuse)

    @property
    def peak_extra(self) -> int:
        return self.peak - self.now


def parse_size(text: str) -> int:
    """`--disk-budget`: bytes, or a number with kB, MB, GB, TB (powers of 1000) or KiB,
    MiB, GiB, TiB."""
    found = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = found.group(2).lower() if found else ""
    if found is None or unit not in _UNITS:
        raise ConfigError(f"--disk-budget {text!r}: give bytes, or e.g. 500MB, 20GB, 1.5TiB")
    return int(float(found.group(1)) * _UNITS[unit])


def toast_bytes(value_bytes: int, values: int = 64) -> float:
    """On-disk bytes per value of `value_bytes` stored out of line, from a simulation of
    how Postgres places each value's chunks (the last page written, else the first page
    with room, else a new page): a 6,152-byte vector (1536 dims) takes a whole page."""
    whole, rest = divmod(value_bytes, TOAST_CHUNK)
    chunks = [TOAST_CHUNK] * whole + ([rest] if rest else [])
    pages: list[int] = []
    last = -1
    for _ in range(values):
        for chunk in chunks:
            need = (chunk + TOAST_CHUNK_OVERHEAD + 7) // 8 * 8
            if last >= 0 and pages[last] >= need:
                pages[last] -= need
                continue
            last = next((i for i, free in enumerate(pages) if free >= need), -1)
            if last < 0:
                pages.append(PAGE_ROOM)
                last = len(pages) - 1
            pages[last] -= need
    return len(pages) * PAGE / values + len(chunks) * TOAST_INDEX_ENTRY


def estimate(conn: psycopg.Connection, live: Slot, rows: int, dimensions: int, kind: str,
             ann_index_bytes: int) -> DiskEstimate:
    """From the table's sizes now and the live column's stored vectors (a sample)."""
    table = live.table.as_string(conn)
    sizes = conn.execute(
        "SELECT pg_total_relation_size(c.oid), pg_relation_size(c.oid),"
        " pg_indexes_size(c.oid),"
        " coalesce(pg_total_relation_size(nullif(c.reltoastrelid, 0)), 0)"
        " FROM pg_class c WHERE c.oid = %s::regclass", (table,)).fetchone()
    assert sizes is not None
    total, heap, indexes, toast = (int(x) for x in sizes)
    stored = conn.execute(sql.SQL(
        "SELECT count(*), avg(pg_column_size(v)) FROM (SELECT {} AS v FROM {}"
        " WHERE {} IS NOT NULL LIMIT 1000) s").format(live.vector, live.table, live.vector)
    ).fetchone()
    live_count = int(conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} IS NOT NULL")
                                  .format(live.table, live.vector)).fetchone()[0]  # type: ignore[index]
                     ) if stored and stored[0] else 0
    live_bytes = int(stored[1]) if stored and stored[1] else 0
    new_bytes = (2 if kind == "halfvec" else 4) * dimensions + 8

    def per_row(value: int) -> float:
        return toast_bytes(value) if value > TOAST_THRESHOLD // 2 else float(value)

    new_vectors = rows * per_row(new_bytes)
    old_vectors = live_count * per_row(live_bytes) if live_bytes else 0.0
    if live_bytes and (toast and live_bytes > TOAST_THRESHOLD // 2):
        # Same shape as the live vectors: the TOAST table's own figure is the better one.
        measured = toast / max(1, live_count)
        if per_row(live_bytes) and abs(measured / per_row(live_bytes) - 1) < 0.5:
            new_vectors *= measured / per_row(live_bytes)
            old_vectors = float(min(toast, live_count * measured))
    new_index = ann_index_bytes * new_bytes / live_bytes if live_bytes else 0.0
    # Each update of the fill writes a new row version (and, not HOT, a new entry in every
    # btree); pruning and autovacuum reuse most of it: a tenth of heap and indexes.
    churn = 0.1 * (heap + indexes - ann_index_bytes) + rows * 16  # + the pending index
    peak = total + new_vectors + new_index + churn
    after = peak - ann_index_bytes
    live_after = total - old_vectors - ann_index_bytes + new_vectors + new_index
    return DiskEstimate(total, round(peak), round(after), round(live_after))
