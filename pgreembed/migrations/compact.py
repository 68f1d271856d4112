"""`migrate compact`: after finalize, give the freed TOAST space back to the OS.

finalize clears the replaced column (migrations.clear): its vectors' space is free for the
table's next writes, but it sits at the front of the TOAST file, and the live vectors,
written by the fill after the old ones, sit at its end. A plain VACUUM returns only empty
pages at the end of a file, so the table stays ~1.5x its size before on disk (1536 dims,
bench.migration_space) until the next migration fills the front.

A TOASTed value moves only when it is stored again: the live column is assigned a freshly
built copy of its own value (`vector(v, dims, true)`, pgvector's typmod function, which
detoasts), so Postgres writes new chunks where its free space map finds room (the freed
front, once VACUUM has recorded it) and the old chunks die. Which values sit in the tail
is read from the heap alone (an ordinary role may not read schema pg_toast): TOAST ids
are handed out in order and a value written when there was no free room went to the end
of the file, so the newest ids are the tail's. As many of them as fill the pages past
what the live vectors need (`boundary`) are moved, newest first in rounds (the ids are
held, 4 bytes a row; a round reads its own rows' keys again by id range), each batch its own
short transaction (table_lock.run_locked; rows the app holds are skipped, FOR NO KEY
UPDATE SKIP LOCKED in key order, and tried again later), guarded by the value's TOAST id
(a row the app rewrote meanwhile is left alone: its new value already went to free room).
Then VACUUM truncates the empty tail.

The cost: the update changes an indexed column's bytes (a new TOAST pointer), so it is not
HOT: every index of the table gets an entry for the row again, the live HNSW index
included, where pgvector searches the graph, finds the unchanged vector and adds the heap
TID to its element (no index growth, but a search per row: about the cost of writing the
vector in place). bench.compact_space measures it. Opt-in for that reason.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from pgreembed.config import Settings, Target
from pgreembed.errors import MigrationError
from pgreembed.migrations.disk import PAGE, TOAST_CHUNK, TOAST_INDEX_ENTRY, toast_bytes
from pgreembed.migrations.state import open_migration
from pgreembed.store import server_versions
from pgreembed.store.pool import connect
from pgreembed.store.slots import load_slots
from pgreembed.store.table_lock import LockPolicy, run_locked

log = logging.getLogger(__name__)

ROWS_PER_TRANSACTION = 32  # a non-HOT update each (an HNSW graph search): ~0.1-0.2 s
PAGES_PER_SCAN = 64  # heap pages read per step of the walk
MARGIN = 1.02  # the boundary's slack over the pages the live vectors need
MAX_ROUNDS = 6  # enough rounds of ROUND_SHARE for every value; a VACUUM each
ROUND_SHARE = 0.2  # of the live vectors moved per round, newest first
DONE_WITHIN = 1.05  # of the boundary: the file is compact enough
HORIZON_WAIT = 10.0  # seconds of VACUUM retries while an older app transaction pins chunks


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
    oid: int  # the TOAST table (by oid: an ordinary role may not name schema pg_toast)
    pages: int
    boundary: int  # pages the live vectors need: the file is compact at or below it
    values: int  # live TOASTed values
    pages_per_value: float


@dataclass(frozen=True)
class Compacted:
    moved: int  # rows whose vector was stored again
    held: int  # tail rows the app kept locked through every try (they stay in the tail)
    stopped_full: bool  # the front ran out of room before the tail was empty
    toast_pages_before: int
    toast_pages_after: int  # after VACUUM
    table_bytes_before: int = 0  # pg_total_relation_size (heap + TOAST + indexes)
    table_bytes_after: int = 0


def compact_target(settings: Settings, target: Target, policy: LockPolicy | None = None,
                   progress: Callable[[int, int], None] | None = None) -> Compacted:
    """`migrate compact`: the target's live column, between migrations (during one the
    front is not free yet: the replaced vectors leave at finalize)."""
    with connect(settings.database_url) as conn:
        server_versions.require(conn, server_versions.COMPACT, MigrationError)
        migration = open_migration(conn, target)
        if migration is not None:
            raise MigrationError(
                f"target {target.name!r} has a migration in progress ({migration.phase}):"
                " compact frees the replaced vectors' space, which finalize clears; run"
                " it after `pgreembed migrate finalize`")
        live = next((s for s in load_slots(conn, target) if s.role == "live"), None)
        conn.rollback()
    if live is None:
        raise MigrationError(f"target {target.name!r} is not initialised: pgreembed init")
    col = Column(live.table, live.pk, live.vector, live.pk_type, live.vector_type,
                 live.dimensions)
    before = table_bytes(settings.database_url, col)
    done = compact(settings.database_url, col, policy or LockPolicy(), progress=progress)
    return dataclasses.replace(done, table_bytes_before=before,
                               table_bytes_after=table_bytes(settings.database_url, col))


def table_bytes(dsn: str, col: Column) -> int:
    with connect(dsn) as conn:
        row = conn.execute("SELECT pg_total_relation_size(%s::regclass)",
                           (col.table.as_string(conn),)).fetchone()
        conn.rollback()
    return int(row[0]) if row else 0


def toast_layout(conn: psycopg.Connection, col: Column) -> Toast | None:
    """The TOAST table's size and the boundary (from the heap's TOAST pointers: an ordinary
    role may not read schema pg_toast), or None when the table has no TOAST table."""
    row = conn.execute("SELECT reltoastrelid::bigint, pg_relation_size(reltoastrelid)"
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
        per_value = (toast_bytes(size) - math.ceil(size / TOAST_CHUNK) * TOAST_INDEX_ENTRY
                     ) / PAGE
    boundary = math.ceil(values * per_value * MARGIN) + 1
    return Toast(int(row[0]), int(row[1]) // PAGE, boundary, values, per_value)


def _toast_pages(dsn: str, toast: Toast) -> int:
    with connect(dsn) as conn:
        row = conn.execute("SELECT pg_relation_size(%s::oid::regclass)", (toast.oid,)
                           ).fetchone()
        conn.rollback()
    return int(row[0]) // PAGE if row else 0


def _scan(dsn: str, col: Column, where: sql.Composable | None = None,
          params: dict[str, int] | None = None) -> Generator[list[tuple[int, str]]]:
    """(TOAST id, key as text) of the rows whose vector is TOASTed (and match `where`),
    a list per PAGES_PER_SCAN heap pages, each read in a short transaction of its own
    (a TID range scan)."""
    with connect(dsn) as conn:
        row = conn.execute("SELECT pg_relation_size(%s::regclass)",
                           (col.table.as_string(conn),)).fetchone()
        conn.rollback()
        pages = int(row[0]) // PAGE if row else 0
        for first in range(0, pages + 1, PAGES_PER_SCAN):
            rows = conn.execute(sql.SQL(
                "SELECT pg_column_toast_chunk_id({v}), {pk}::text FROM {t}"
                " WHERE ctid >= ('(' || %(first)s::bigint || ',0)')::tid"
                "   AND ctid < ('(' || %(last)s::bigint || ',0)')::tid"
                "   AND pg_column_toast_chunk_id({v}) IS NOT NULL AND {where}").format(
                v=col.vector, pk=col.pk, t=col.table, where=where or sql.SQL("true")),
                {"first": first, "last": first + PAGES_PER_SCAN} | (params or {})).fetchall()
            conn.rollback()
            yield [(int(r[0]), str(r[1])) for r in rows]


def _stored_ids(dsn: str, col: Column) -> np.ndarray:
    """The TOAST id of every row whose vector is TOASTed, newest first: ids are handed out
    in order and a value written when there was no free room went to the end of the
    file, so the newest fill's vectors are the tail's. Ids only (4 bytes a row: 40 MB
    at 10M rows); the rounds read their rows' keys again by id range (`_rows_between`)."""
    ids = np.concatenate([np.array([i for i, _ in rows], dtype=np.uint32)
                          for rows in _scan(dsn, col)] or [np.zeros(0, np.uint32)])
    return np.sort(ids)[::-1]


def _rows_between(dsn: str, col: Column, oldest: int, newest: int
                  ) -> list[tuple[int, str]]:
    """The rows whose TOAST id is within [oldest, newest] (one round's: ROUND_SHARE of
    the rows at most in memory), newest first. The order matters: moved in heap order at
    10,000 x 1536 the file did not shrink (1.44x after compact, bench.compact_space,
    2026-12-07), newest first it did (1.01x)."""
    within = sql.SQL("pg_column_toast_chunk_id({v}) BETWEEN %(oldest)s::oid AND"
                     " %(newest)s::oid").format(v=col.vector)
    found = [row for rows in _scan(dsn, col, within, {"oldest": oldest, "newest": newest})
             for row in rows]
    return sorted(found, reverse=True)


def _move(conn: psycopg.Connection, col: Column, batch: list[tuple[int, str]]
          ) -> list[tuple[int, str]]:
    """One transaction: store again the vectors of `batch` rows whose TOAST id is still
    the one seen, skipping rows the app holds; those skipped (still the same id: a row
    the app rewrote meanwhile is done, its new value went to free room)."""
    params = {"ids": [i for i, _ in batch], "keys": [k for _, k in batch]}
    seen = sql.SQL("SELECT * FROM unnest(%(ids)s::oid[], %(keys)s::text[]) AS s(id, k)")
    # No WITH on the UPDATE: an app's DO ALSO rule on the table refuses one.
    conn.execute(sql.SQL(
        """
        UPDATE {t} a SET {v} = {fresh}
        FROM (
            SELECT b.{pk} AS k FROM {t} b JOIN ({seen}) seen ON b.{pk} = seen.k::{pk_type}
            WHERE pg_column_toast_chunk_id(b.{v}) = seen.id
            ORDER BY b.{pk} FOR NO KEY UPDATE OF b SKIP LOCKED) free
        WHERE a.{pk} = free.k
        """).format(seen=seen, pk=col.pk, t=col.table, v=col.vector, fresh=col.fresh,
                    pk_type=sql.SQL(col.pk_type)), params)
    rows = conn.execute(sql.SQL(
        "WITH seen AS ({seen}) SELECT seen.id, seen.k FROM {t} a"
        " JOIN seen ON a.{pk} = seen.k::{pk_type}"
        " WHERE pg_column_toast_chunk_id(a.{v}) = seen.id").format(
        seen=seen, pk=col.pk, t=col.table, v=col.vector, pk_type=sql.SQL(col.pk_type)),
        params).fetchall()
    return [(int(r[0]), str(r[1])) for r in rows]


def compact(dsn: str, col: Column, policy: LockPolicy, *,
            rows_per_transaction: int = ROWS_PER_TRANSACTION,
            vacuum: Callable[[], None] | None = None,
            progress: Callable[[int, int], None] | None = None) -> Compacted:
    """Move the live vectors of the TOAST file's tail into its freed front, then VACUUM
    (which truncates the emptied tail). In rounds: a fifth of the values, newest first,
    then VACUUM, until the file is within 5% of the boundary (moving them all at once
    would also move values already in front, into room the tail's values needed: the
    moved values' old room is free only after VACUUM)."""
    run = functools.partial(run_locked, dsn, col.table, "compact", policy=policy)
    vacuum = vacuum or functools.partial(vacuum_table, dsn, col)
    vacuum()  # the freed front must be in the free space map before anything moves
    with connect(dsn) as conn:
        toast = toast_layout(conn, col)
        conn.rollback()
    if toast is None or toast.pages <= toast.boundary or not toast.values:
        pages = toast.pages if toast else 0
        return Compacted(0, 0, False, pages, pages)
    ids = _stored_ids(dsn, col)
    if not len(ids):  # rewritten meanwhile: nothing TOASTed is left to move
        return Compacted(0, 0, False, toast.pages, toast.pages)
    log.info("compact: TOAST file %d pages, the live vectors need ~%d (%d values, %.2f pages"
             " each)", toast.pages, toast.boundary, toast.values, toast.pages_per_value)
    moved, seen, at, held, full, pages = 0, 0, 0, [], False, toast.pages

    def move(batch: list[tuple[int, str]]) -> list[tuple[int, str]]:
        """The batch's rows the app held (the rest moved, or were rewritten meanwhile)."""
        nonlocal moved
        left = run(functools.partial(_move, col=col, batch=batch))
        moved += len(batch) - len(left)
        return left

    def retry(rows: list[tuple[int, str]]) -> list[tuple[int, str]]:
        time.sleep(random.uniform(0.05, 0.3))  # the app's transactions end meanwhile
        left: list[tuple[int, str]] = []
        for start in range(0, len(rows), rows_per_transaction):
            left += move(rows[start:start + rows_per_transaction])
        return left

    def vacuum_shrinking(before: int) -> int:
        """VACUUM (it truncates the emptied tail, and the moved values' old room is free
        again); while the file did not shrink, an app transaction older than the moves
        may still see the old chunks (not dead to everyone yet): wait, VACUUM again."""
        vacuum()
        pages = _toast_pages(dsn, toast)
        waited = time.monotonic()
        while pages >= before and time.monotonic() - waited < min(policy.wait_seconds,
                                                                   HORIZON_WAIT):
            time.sleep(random.uniform(0.5, 1.5))
            vacuum()
            pages = _toast_pages(dsn, toast)
        return pages

    step = max(rows_per_transaction, math.ceil(len(ids) * ROUND_SHARE))
    for _ in range(MAX_ROUNDS):
        end = min(len(ids), at + step)
        before = pages
        rows = _rows_between(dsn, col, int(ids[end - 1]), int(ids[at]))
        for start in range(0, len(rows), rows_per_transaction):
            batch = rows[start:start + rows_per_transaction]
            held += move(batch)
            seen += len(batch)
            # No room left in front: what moves now only extends the file.
            full = _toast_pages(dsn, toast) > pages
            if progress is not None:
                progress(seen, len(ids))
            if full:
                break
        at = end
        if held and not full:
            held = retry(held)  # a held row in the tail keeps VACUUM from truncating
        pages = vacuum_shrinking(before)
        log.info("compact: %d of %d vectors moved, TOAST file now %d pages%s", moved,
                 len(ids), pages, " (no room left before the tail)" if full else "")
        if full or pages <= toast.boundary * DONE_WITHIN or at >= len(ids):
            break
        if pages >= before:  # the tail's values were not these: on with older ones
            log.warning("compact: the TOAST file did not shrink (%d pages): the newest"
                        " values were not all in the tail", pages)
    started = time.monotonic()
    while held and not full and time.monotonic() - started < policy.wait_seconds:
        held = retry(held)
        if not held:
            pages = vacuum_shrinking(pages)
    if held:
        log.warning("compact: %d rows stayed locked by the app; their vectors stay in the"
                    " tail", len(held))
    return Compacted(moved, len(held), full, toast.pages, _toast_pages(dsn, toast))


def vacuum_table(dsn: str, col: Column) -> None:
    """A plain VACUUM (its truncation takes the lock only if it is free, and gives it back
    when someone waits); TRUNCATE true also where the table's vacuum_truncate is off."""
    with connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("VACUUM (TRUNCATE true) {}").format(col.table))
