"""Finding pending rows: keyset pages over small indexes, never a table scan.

A row of a slot is pending when
- its vector is NULL (new, or its text changed: the trigger cleared it), found
  through the slot's partial index, unless it failed before on this same text;
- or its vector came from another model than the slot's (an in-place model
  change), found through the state table's (model, pk) index.

A migration's new column has no partial index until `migrate index` (so that its fill's
updates can be HOT: store.setup.pending_index_at_setup): its missing rows are found by
the same keyset query, which then walks the primary key from the cursor; the caller
keeps the cursor between passes (one walk of the table per sweep, not per page) and
paces sweeps that start from the beginning again (`ScanPacer`).

Both queries start from the app's table: a state row alone proves nothing (the
row it describes may have been deleted while the triggers were off, or before
they existed), and trusting one would enqueue a key no worker can ever finish.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.store import catalog
from pgreembed.store.slots import Slot


@dataclass
class Cursor:
    """Where the last page ended; `None` keys mean "from the start"."""

    missing_after: Any = None
    outdated_after: Any = None


def _after(column: sql.Composable, value: Any) -> tuple[sql.Composable, tuple[Any, ...]]:
    if value is None:
        return sql.SQL("TRUE"), ()
    return sql.SQL("{} > %s").format(column), (value,)


def missing_page(conn: psycopg.Connection, slot: Slot, after: Any, limit: int) -> list[Any]:
    """Primary keys with a NULL vector after `after`, skipping rows failed on this text.
    The cursor bounds the state side of the join too (`rows_with_state(after=...)`): the
    rows before it are the ones written meanwhile, and a page must not read them."""
    condition, params = _after(sql.SQL("a.{}").format(slot.pk), after)
    bound = None if after is None else sql.Placeholder()
    query = sql.SQL(
        """
        SELECT a.{pk} FROM {rows}
        WHERE {pending} AND {condition}
        ORDER BY a.{pk} LIMIT %s
        """
    ).format(pk=slot.pk, rows=slot.rows_with_state(outer=True, after=bound),
             pending=slot.pending(), condition=condition)
    # In the order of the text: the join's bound, the WHERE's, the limit.
    return [row[0] for row in conn.execute(query, (*params, *params, limit))]


def outdated_page(conn: psycopg.Connection, slot: Slot, after: Any, limit: int) -> list[Any]:
    """Primary keys of existing rows whose vector was made by another model than the
    slot's (a state row of a deleted row is not work: the join drops it)."""
    condition, params = _after(sql.SQL("s.pgr_pk"), after)
    query = sql.SQL(
        """
        SELECT s.pgr_pk FROM {rows}
        WHERE s.pgr_model_id = ANY(%s) AND {condition} AND NOT {failed}
        ORDER BY s.pgr_pk LIMIT %s
        """
    ).format(rows=slot.rows_with_state(), condition=condition,
             failed=slot.failed_on(sql.SQL("s.pgr_hash")))
    old_models = [
        r[0] for r in conn.execute("SELECT id FROM pgreembed.models WHERE id <> %s",
                                   (slot.model_id,))
    ]
    if not old_models:
        return []
    return [row[0] for row in conn.execute(query, (old_models, *params, limit))]


def sweep(conn: psycopg.Connection, slot: Slot, page_size: Callable[[], int],
          cursor: Cursor | None = None) -> Iterator[list[Any]]:
    """Pages of pending keys from `cursor` to the end of both sources.

    The cursor is advanced as pages are yielded, so a caller that stops early
    (its in-flight budget is spent) resumes where it left off next time;
    `page_size` is asked before each page, so a page never exceeds what the
    caller can still take.
    """
    cursor = cursor if cursor is not None else Cursor()
    for page_of, field in ((missing_page, "missing_after"), (outdated_page, "outdated_after")):
        while page := page_of(conn, slot, getattr(cursor, field), page_size()):
            setattr(cursor, field, page[-1])
            yield page


def indexed(conn: psycopg.Connection, slot: Slot) -> bool:
    """Whether the slot's missing rows are found through its partial pending index (a
    valid one exists), rather than by walking the table's primary key."""
    return bool(catalog.index_valid(conn, slot.target.schema, slot.pending_index_name))


@dataclass
class ScanPacer:
    """When a sweep that walks the table (no pending index) may start again: `factor`
    times as long after the last one ended as the sweep took, between `least` and `most`
    seconds, so the walks take at most ~1/factor of the scheduler's time and of a core of
    the server's, whatever the table's size. Rows that become pending behind the cursor
    (the app edits or inserts them) wait at most that long."""

    factor: float = 10.0
    # A small table's walk takes milliseconds: a second between walks left the app's
    # edits NULL in the new column for that long, and a fill under 5 edits/s never had
    # all its rows filled at once (test_crash_safety's manual migration timed out).
    least: float = 0.25
    most: float = 60.0
    _next: dict[int, float] = dataclass_field(default_factory=dict)

    def due(self, slot_id: int) -> bool:
        return time.monotonic() >= self._next.get(slot_id, 0.0)

    def swept(self, slot_id: int, seconds: float) -> None:
        pause = min(self.most, max(self.least, self.factor * seconds))
        self._next[slot_id] = time.monotonic() + pause

    def forget(self, slot_id: int) -> None:
        self._next.pop(slot_id, None)
