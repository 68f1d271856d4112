"""`migrate compact`: after finalize, give the freed TOAST space back to the OS.

finalize clears the replaced column (migrations.clear): its vectors' space is free for the
table's next writes, but it sits at the front of the TOAST file, and the live vectors,
written by the fill after the old ones, sit at its end. A plain VACUUM returns only empty
pages at the end of a file, so the table stays ~1.5x its size before on disk (1536 dims,
bench.migration_space) until the next migration fills the front.

A TOASTed value moves only when it is stored again: the live column is assigned a freshly
built copy of its own value (`vector(v, dims, true)`, pgvector's typmod function, which
detoasts), so Postgres writes new chunks where its free space map finds room (the freed
front, once VACUUM has recorded it) and the old chunks die. Only the rows whose vector has
a chunk beyond the pages the live vectors need (`boundary`) are moved, each batch its own
short transaction (table_lock.run_locked; rows the app holds are skipped, FOR NO KEY
UPDATE SKIP LOCKED in key order, and tried again later), guarded by the value's TOAST id
(a row the app rewrote meanwhile is left alone: its new value already went to free space).
Then VACUUM truncates the empty tail.

The cost: the update changes an indexed column's bytes (a new TOAST pointer), so it is not
HOT: every index of the table gets an entry for the row again, the live HNSW index
included, where pgvector searches the graph, finds the unchanged vector and adds the heap
TID to its element (no index growth, but a search per row: about the cost of writing the
vector in place). bench.compact_space measures it. Opt-in for that reason.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.migrations.disk import PAGE, TOAST_CHUNK, TOAST_INDEX_ENTRY, toast_bytes
from pgreembed.store.pool import connect
from pgreembed.store.table_lock import LockPolicy, run_locked

log = logging.getLogger(__name__)

ROWS_PER_TRANSACTION = 32  # a non-HOT update each (an HNSW graph search): ~0.1-0.2 s
PAGES_PER_SCAN = 64  # heap pages read per step of the walk
MARGIN = 1.02  # the boundary's slack over the pages the live vectors need


@dataclass(frozen=True)
class Column:
    """The live vector column of an app table."""

    table: sql.Identifier
    pk: sql.Identifier
    vector: sql.Identifier
    pk_type: str  # the key's SQL type (keys travel as text)
    vector_type: str  # vector or halfvec
    dimensions: int

    @property
    def fresh(self) -> sql.Composed:
        """The column's value, detoasted: assigning it stores the vector again."""
        return sql.SQL("{}({}, {}, true)").format(
            sql.Identifier(self.vector_type), self.vector, sql.Literal(self.dimensions))


@dataclass(frozen=True)
class Toast:
    relation: str  # the TOAST table's qualified name (regclass text)
    pages: int
    boundary: int  # pages the live vectors need: values with a chunk at or past it move
    values: int  # live TOASTed values


@dataclass(frozen=True)
class Compacted:
    moved: int  # rows whose vector was stored again
    held: int  # tail rows the app kept locked through every try (they stay in the tail)
    stopped_full: bool  # the front ran out of room before the tail was empty
    toast_pages_before: int
    toast_pages_after: int  # after VACUUM


def toast_layout(conn: psycopg.Connection, col: Column) -> Toast | None:
    """The TOAST table and the boundary, or None when the table has no TOAST table."""
    row = conn.execute("SELECT reltoastrelid::regclass::text, pg_relation_size(reltoastrelid)"
                       " FROM pg_class WHERE oid = %s::regclass AND reltoastrelid <> 0",
                       (col.table.as_string(conn),)).fetchone()
    if row is None:
        return None
    stored = conn.execute(sql.SQL(
        "SELECT count(*), coalesce(avg(pg_column_size({v})), 0) FROM {t}"
        " WHERE pg_column_toast_chunk_id({v}) IS NOT NULL").format(
        v=col.vector, t=col.table)).fetchone()
    assert stored is not None
    values, size = int(stored[0]), int(stored[1])
    per_value = 0.0
    if values:
        per_value = toast_bytes(size) - math.ceil(size / TOAST_CHUNK) * TOAST_INDEX_ENTRY
    boundary = math.ceil(values * per_value / PAGE * MARGIN) + 1
    return Toast(str(row[0]), int(row[1]) // PAGE, boundary, values)


def _toast_pages(conn: psycopg.Connection, toast: Toast) -> int:
    row = conn.execute("SELECT pg_relation_size(%s::regclass)", (toast.relation,)).fetchone()
    return int(row[0]) // PAGE if row else 0


def _heap_pages(conn: psycopg.Connection, col: Column) -> int:
    row = conn.execute("SELECT pg_relation_size(%s::regclass)",
                       (col.table.as_string(conn),)).fetchone()
    return int(row[0]) // PAGE if row else 0


def _tail_rows(conn: psycopg.Connection, col: Column, toast: Toast, first: int, last: int
               ) -> list[tuple[Any, int]]:
    """(key, TOAST id) of the rows on heap pages [first, last) whose vector has a chunk
    at or past the boundary (one probe of the TOAST index per row)."""
    rows = conn.execute(sql.SQL(
        """
        SELECT h.k, h.id FROM (
            SELECT {pk} AS k, pg_column_toast_chunk_id({v}) AS id FROM {t}
            WHERE ctid >= ('(' || %(first)s::bigint || ',0)')::tid
              AND ctid < ('(' || %(last)s::bigint || ',0)')::tid) h
        WHERE h.id IS NOT NULL AND EXISTS (
            SELECT 1 FROM {toast} c WHERE c.chunk_id = h.id
              AND c.ctid >= ('(' || %(boundary)s::bigint || ',0)')::tid)
        ORDER BY h.k
        """).format(pk=col.pk, v=col.vector, t=col.table,
                    toast=sql.SQL(toast.relation)),  # regclass text: already quoted
        {"first": first, "last": last, "boundary": toast.boundary}).fetchall()
    conn.commit()
    return [(r[0], int(r[1])) for r in rows]


def _move(conn: psycopg.Connection, col: Column, batch: list[tuple[Any, int]]) -> list[Any]:
    """One transaction: store again the vectors of `batch` rows whose TOAST id is still
    the one seen (skipping rows the app holds); the keys moved."""
    keys = [k for k, _ in batch]
    ids = [i for _, i in batch]
    rows = conn.execute(sql.SQL(
        """
        WITH seen AS (SELECT * FROM unnest(%(keys)s::text[], %(ids)s::oid[]) AS s(k, id)),
        free AS (
            SELECT a.{pk} AS k FROM {t} a JOIN seen ON a.{pk} = seen.k::{pk_type}
            WHERE pg_column_toast_chunk_id(a.{v}) = seen.id
            ORDER BY a.{pk} FOR NO KEY UPDATE OF a SKIP LOCKED)
        UPDATE {t} a SET {v} = {fresh} FROM free WHERE a.{pk} = free.k RETURNING a.{pk}
        """).format(pk=col.pk, t=col.table, v=col.vector, fresh=col.fresh,
                    pk_type=sql.SQL(col.pk_type)),
        {"keys": [str(k) for k in keys], "ids": ids}).fetchall()
    return [r[0] for r in rows]


def compact(dsn: str, col: Column, policy: LockPolicy, *,
            rows_per_transaction: int = ROWS_PER_TRANSACTION,
            vacuum: Callable[[], None] | None = None,
            progress: Callable[[int, int], None] | None = None) -> Compacted:
    """Move the live vectors stored past the boundary into the freed front, then VACUUM."""
    run = functools.partial(run_locked, dsn, col.table, "compact", policy=policy)
    vacuum = vacuum or functools.partial(vacuum_table, dsn, col)
    vacuum()  # the freed front must be in the free space map before anything moves
    with connect(dsn) as conn:
        toast = toast_layout(conn, col)
        conn.commit()
        if toast is None:
            return Compacted(0, 0, False, 0, 0)
        heap_pages = _heap_pages(conn, col)
        conn.commit()
    moved, held, full = 0, [], False
    for first in range(0, heap_pages, PAGES_PER_SCAN):
        with connect(dsn) as conn:
            tail = _tail_rows(conn, col, toast, first, first + PAGES_PER_SCAN)
        for start in range(0, len(tail), rows_per_transaction):
            batch = tail[start:start + rows_per_transaction]
            done = run(functools.partial(_move, col=col, batch=batch))
            moved += len(done)
            got = set(map(str, done))
            held += [r for r in batch if str(r[0]) not in got]
            with connect(dsn) as conn:
                grew = _toast_pages(conn, toast) > toast.pages
                conn.commit()
            if grew:  # no room left in front: what moves now would only extend the file
                full = True
                break
        if progress is not None:
            progress(min(first + PAGES_PER_SCAN, heap_pages), heap_pages)
        if full:
            break
    started = time.monotonic()
    while held and not full and time.monotonic() - started < policy.wait_seconds:
        time.sleep(random.uniform(0.05, 0.3))  # the app's transactions end meanwhile
        retry, held = held, []
        for start in range(0, len(retry), rows_per_transaction):
            batch = retry[start:start + rows_per_transaction]
            done = run(functools.partial(_move, col=col, batch=batch))
            moved += len(done)
            got = set(map(str, done))
            held += [r for r in batch if str(r[0]) not in got]
    vacuum()
    with connect(dsn) as conn:
        after = _toast_pages(conn, toast)
        conn.commit()
    if held:
        log.warning("compact: %d rows stayed locked by the app; their vectors stay in the"
                    " tail", len(held))
    return Compacted(moved, len(held), full, toast.pages, after)


def vacuum_table(dsn: str, col: Column) -> None:
    """A plain VACUUM (its truncation takes the lock only if it is free, and gives it back
    when someone waits)."""
    with connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM {}").format(col.table))
