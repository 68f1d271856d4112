"""finalize's first half: the replaced column's vectors leave the disk before DROP COLUMN.

DROP COLUMN frees nothing: every dropped value (TOAST included) stays until its row is
rewritten, so each migration used to leave a whole copy of the vectors behind (a table
1.49x its size after one migration, 1.95x after two; bench.migration_space). Setting the
column to NULL first frees each row's TOASTed vector (its chunks are dead at commit, and
the next VACUUM makes the space reusable by the table).

An update that is not HOT files the row again in every index, the live HNSW index
included (a graph search per row: as costly as writing the vector). So before clearing,
the column's own indexes go (DROP INDEX CONCURRENTLY: the index would go with the column
anyway, and its lock conflicts with none of the app's reads or writes), and the rows are
cleared one per heap page per round, each round its own short transaction: a page has
room for one new row version only after the previous round's committed versions are
pruned, which happens when the page is next read. Rows moved meanwhile and rows the app
held locked are cleared by key-order passes at the end. Every transaction goes through
table_lock.run_locked (short lock_timeout, jittered retries) and skips rows the app holds
(FOR NO KEY UPDATE SKIP LOCKED, in key order): it never waits on the app's row locks.
An interrupted clearing resumes where it is: rows already NULL are not touched again.
"""

from __future__ import annotations

import functools
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.errors import MigrationError, TableBusyError
from pgreembed.migrations.index import column_indexes
from pgreembed.store.pool import connect
from pgreembed.store.rows import lock_slot
from pgreembed.store.session import lift_statement_limits
from pgreembed.store.slots import Slot, app_table
from pgreembed.store.table_lock import LockPolicy, run_locked

log = logging.getLogger(__name__)

PAGES_PER_RANGE = 256  # a round clears at most one row per page of a range
ROWS_PER_PASS_CHUNK = 500  # the key-order passes at the end
ROWS_PER_PAGE = 1


@dataclass(frozen=True)
class Cleared:
    rows: int
    left: int  # rows the app kept locked through every pass: DROP COLUMN leaves them


def drop_column_indexes(dsn: str, old: Slot, policy: LockPolicy, step: str = "finalize"
                        ) -> list[str]:
    """DROP INDEX CONCURRENTLY every index on the old column, its pending index included
    (an indexed column changed rules HOT out). Its SHARE UPDATE EXCLUSIVE lock queues
    behind no read or write of the app, so it may wait up to `policy.wait_seconds`; it
    also waits for transactions that use the table (the app's included) to end."""
    with connect(dsn, autocommit=True) as conn:
        lift_statement_limits(conn)
        names = [i.name for i in column_indexes(conn, old)] + [old.pending_index_name]
        conn.execute(sql.SQL("SET lock_timeout = {}").format(
            sql.Literal(f"{int(policy.wait_seconds * 1000)}ms")))
        dropped = []
        for name in names:
            try:
                conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                    sql.Identifier(old.target.schema, name)))
            except psycopg.errors.LockNotAvailable as exc:
                raise TableBusyError(f"{step}: could not drop index {name} in"
                                     f" {policy.wait_seconds:.0f} s (the table stayed in"
                                     f" use); run {step} again") from exc
            except psycopg.errors.DependentObjectsStillExist:
                continue  # a constraint's index: DROP COLUMN decides (refuse_drop ran)
            dropped.append(name)
        return dropped


def remaining(dsn: str, old: Slot) -> int:
    """Rows whose old vector is still there."""
    with connect(dsn) as conn:
        row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} IS NOT NULL").format(
            old.table, old.vector)).fetchone()
        conn.rollback()
    return int(row[0]) if row else 0


def clear(dsn: str, old: Slot, policy: LockPolicy, *, pages_per_range: int = PAGES_PER_RANGE,
          step: str = "finalize") -> Cleared:
    """Set the column to NULL in every row (see the module's docstring). `old` is the slot
    being cleared: finalize's replaced column, or cancel's new one (`step`)."""
    run = functools.partial(run_locked, dsn, app_table(old.target), f"{step} (clearing)",
                            policy=policy)
    cleared = 0
    pages = _pages(dsn, old)
    for first in range(0, pages, pages_per_range):
        while True:
            done = run(functools.partial(_round, old=old, first=first,
                                         last=first + pages_per_range))
            cleared += done
            if not done:
                break
    # Rows moved behind the walk (an update that found no room) and rows the app held.
    started = time.monotonic()
    while True:
        after: Any = None
        this_pass = 0
        while True:
            done, after = run(functools.partial(_chunk, old=old, after=after))
            this_pass += done
            if after is None:
                break
        cleared += this_pass
        left = remaining(dsn, old)
        if not left:
            return Cleared(cleared, 0)
        if time.monotonic() - started > policy.wait_seconds:
            log.warning("%d rows of %s kept their vector (locked by the app"
                        " through every pass for %.0f s): DROP COLUMN leaves them until"
                        " they are rewritten", left, old.vector_column, policy.wait_seconds)
            return Cleared(cleared, left)
        time.sleep(random.uniform(0.05, 0.3))  # the app's transactions end meanwhile


def _pages(dsn: str, old: Slot) -> int:
    with connect(dsn) as conn:
        row = conn.execute("SELECT pg_relation_size(%s::regclass)"
                           " / current_setting('block_size')::int",
                           (old.table.as_string(conn),)).fetchone()
        conn.rollback()
    return int(row[0]) if row else 0


def _still_old(conn: psycopg.Connection, old: Slot) -> Slot:
    """The slot being cleared (finalize: the replaced one, cancel: the new one) under the
    table's ROW EXCLUSIVE lock, unchanged since the clearing began: no swap can move its
    column until commit (store.rows.lock_slot)."""
    slot = lock_slot(conn, old.target, old.id, "ROW EXCLUSIVE")
    if slot is None or slot.role != old.role or slot.vector_column != old.vector_column:
        raise MigrationError(f"target {old.target.name!r}: column {old.vector_column} is no"
                             " longer the one being cleared; nothing cleared")
    return slot


def _round(conn: psycopg.Connection, old: Slot, first: int, last: int) -> int:
    """One transaction: at most ROWS_PER_PAGE rows per page of pages [first, last).
    One UPDATE with its row choice in a subquery, no WITH: an app table with a DO ALSO
    rule refuses WITH in a query its rules rewrite into several."""
    slot = _still_old(conn, old)
    cur = conn.execute(sql.SQL(
        """
        UPDATE {table} a SET {old} = NULL
        FROM (
            SELECT b.{pk} AS pk FROM {table} b JOIN (
                SELECT pk FROM (
                    SELECT {pk} AS pk, row_number() OVER (
                        PARTITION BY (ctid::text::point)[0] ORDER BY ctid) AS n
                    FROM {table}
                    WHERE ctid >= ('(' || %(first)s::bigint || ',0)')::tid
                      AND ctid < ('(' || %(last)s::bigint || ',0)')::tid
                      AND {old} IS NOT NULL) x
                WHERE n <= %(per_page)s) picked ON b.{pk} = picked.pk
            ORDER BY b.{pk} FOR NO KEY UPDATE OF b SKIP LOCKED
        ) f
        WHERE a.{pk} = f.pk AND a.{old} IS NOT NULL
        """).format(pk=slot.pk, table=slot.table, old=slot.vector),
        {"first": first, "last": last, "per_page": ROWS_PER_PAGE})
    return max(cur.rowcount, 0)


def _chunk(conn: psycopg.Connection, old: Slot, after: Any) -> tuple[int, Any]:
    """One transaction: the next ROWS_PER_PASS_CHUNK rows by key that still hold an old
    vector; (cleared, last key seen or None at the end). The keys are read first, then
    cleared by one UPDATE without WITH (see _round)."""
    slot = _still_old(conn, old)
    # max() has no uuid version (a chunk table's key): the last key by ORDER BY of the
    # qualified column (a bare name would order by the text output: '99' > '100')
    keys = [r[0] for r in conn.execute(sql.SQL(
        """
        SELECT {pk}::text FROM {table}
        WHERE (%(after)s::{pk_type} IS NULL OR {pk} > %(after)s::{pk_type})
          AND {old} IS NOT NULL
        ORDER BY {pk} LIMIT %(rows)s
        """).format(pk=slot.pk, table=slot.table, old=slot.vector, pk_type=slot.pk_cast),
        {"after": after, "rows": ROWS_PER_PASS_CHUNK}).fetchall()]
    if not keys:
        return 0, None
    cur = conn.execute(sql.SQL(
        """
        UPDATE {table} a SET {old} = NULL
        FROM (
            SELECT b.{pk} AS pk FROM {table} b
            WHERE b.{pk} = ANY(ARRAY(SELECT unnest(%(keys)s::text[])::{pk_type}))
            ORDER BY b.{pk} FOR NO KEY UPDATE OF b SKIP LOCKED
        ) f
        WHERE a.{pk} = f.pk AND a.{old} IS NOT NULL
        """).format(pk=slot.pk, table=slot.table, old=slot.vector, pk_type=slot.pk_cast),
        {"keys": keys})
    return max(cur.rowcount, 0), keys[-1]
