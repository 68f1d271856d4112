"""How big a column's backlog is, cheaply, and copying vectors a side column can reuse.

Both serve the side fill (pgreembed.migrations.side_fill): the decision reads only the
partial pending index and the state table's (model, pk) index, stopping at the
threshold; the copy walks the table by primary key in short transactions.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from pgreembed.errors import MigrationError
from pgreembed.store.rows import lock_slot
from pgreembed.store.slots import Slot, load_slot


def backlog_at_least(conn: psycopg.Connection, slot: Slot, limit: int) -> int:
    """Rows the slot would embed (no vector, or another model's), counted up to `limit`:
    the answer is exact below it and `limit` at or above it, so a huge backlog costs no
    more than a small one."""
    row = conn.execute(sql.SQL(
        """
        SELECT (SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {vector} IS NULL
                                      LIMIT %(limit)s) m)
             + (SELECT count(*) FROM (SELECT 1 FROM {rows}
                                      WHERE s.pgr_model_id <> %(model)s
                                        AND a.{vector} IS NOT NULL LIMIT %(limit)s) o)
        """).format(table=slot.table, vector=slot.vector, rows=slot.rows_with_state()),
        {"limit": limit, "model": slot.model_id}).fetchone()
    return min(limit, int(row[0])) if row else 0


def copy_page(conn: psycopg.Connection, source: Slot, side: Slot, after: Any,
              limit: int) -> tuple[Any, int, int]:
    """Copy into `side` the vectors of `source` that are of `side`'s model and of the row's
    current text, for the `limit` rows after key `after` (None: from the start), with
    their state rows; one transaction. Returns (last key of the page or None at the end,
    rows copied, rows left because another transaction holds them). A row edited
    meanwhile has its vector cleared by the trigger, so the `IS NOT NULL` and hash
    conditions (re-checked on the new row version) skip it.

    Under `lock_slot`, both columns are the slots' until commit and `side` still belongs
    to the model whose vectors are copied (invariant 7); the rows are locked in key order,
    skipping those the app holds, so the copy never waits on the app (invariant 10).
    """
    bound = sql.SQL("{} > %(after)s").format(sql.Identifier("a", source.primary_key)) \
        if after is not None else sql.SQL("TRUE")
    with conn.transaction():
        now = lock_slot(conn, side.target, side.id, "ROW EXCLUSIVE")
        if now is None or not now.holds_vectors_of(side):
            raise MigrationError(f"target {side.target.name!r}: column {side.vector_column}"
                                 f" is no longer {side.model_key}; nothing copied")
        source = load_slot(conn, source.target, source.id)
        last = conn.execute(sql.SQL(
            "SELECT k FROM (SELECT a.{pk} AS k FROM {table} a WHERE {bound}"
            " ORDER BY a.{pk} LIMIT %(limit)s) p ORDER BY k DESC LIMIT 1").format(
                pk=source.pk, table=source.table, bound=bound),
            {"after": after, "limit": limit}).fetchone()
        if last is None or last[0] is None:
            return None, 0, 0
        found = conn.execute(sql.SQL(
            """
            WITH wanted AS (
                SELECT a.{pk} AS k FROM {table} a JOIN {source_state} s ON {key}
                WHERE {bound} AND a.{pk} <= %(last)s
                  AND s.pgr_model_id = %(model)s AND s.pgr_hash = {hash}
                  AND a.{source} IS NOT NULL AND a.{side} IS NULL
            ), free AS (
                {free}
            ), copied AS (
                UPDATE {table} a SET {side} = a.{source}
                FROM free f, {source_state} s
                WHERE a.{pk} = f.k AND {key}
                  AND s.pgr_model_id = %(model)s AND s.pgr_hash = {hash}
                  AND a.{source} IS NOT NULL AND a.{side} IS NULL
                RETURNING a.{pk} AS k, s.pgr_hash AS h, s.pgr_truncated AS t
            ), recorded AS (
                INSERT INTO {side_state} (pgr_pk, pgr_model_id, pgr_hash, pgr_embedded_at,
                                          pgr_truncated)
                SELECT k, %(model)s, h, now(), t FROM copied
                ON CONFLICT (pgr_pk) DO UPDATE SET pgr_model_id = excluded.pgr_model_id,
                    pgr_hash = excluded.pgr_hash, pgr_embedded_at = excluded.pgr_embedded_at,
                    pgr_truncated = excluded.pgr_truncated, pgr_failed_hash = NULL,
                    pgr_failure = NULL
                RETURNING 1
            )
            SELECT (SELECT count(*) FROM recorded),
                   (SELECT count(*) FROM wanted) - (SELECT count(*) FROM free)
            """).format(free=source.unlocked_rows("wanted", "k"),
                        table=source.table, side=now.vector, source=source.vector,
                        source_state=source.state_table, bound=bound, pk=source.pk,
                        key=source.state_key(),
                        hash=source.hash_expr, side_state=now.state_table),
            {"after": after, "last": last[0], "model": now.model_id}).fetchone()
    assert found is not None
    return last[0], int(found[0]), int(found[1])


def index_memory_bytes(rows: int, dimensions: int, m: int = 16) -> int:
    """What an HNSW build over `rows` needs to stay in memory: each element holds its
    vector and its neighbour lists (2m on layer 0), plus ~25% of headroom."""
    per_row = dimensions * 4 + 2 * m * 8 + 64
    return int(rows * per_row * 1.25)


def build_settings(conn: psycopg.Connection, rows: int, dimensions: int, cap: str,
                   parallel_workers: int | None) -> tuple[str, int]:
    """(maintenance_work_mem, max_parallel_maintenance_workers) for an index build: the
    memory the graph needs, at least the server's setting and at most `cap`; the parallel
    workers asked for, else the server's own max_parallel_maintenance_workers (the DBA's
    choice for builds, 2 by default), never more than max_parallel_workers allows."""
    row = conn.execute(
        "SELECT pg_size_bytes(current_setting('maintenance_work_mem')), pg_size_bytes(%s),"
        " current_setting('max_parallel_maintenance_workers')::int,"
        " current_setting('max_parallel_workers')::int", (cap,)).fetchone()
    assert row is not None
    current, most, server, allowed = (int(value) for value in row)
    memory = min(most, max(current, index_memory_bytes(rows, dimensions)))
    workers = min(server if parallel_workers is None else parallel_workers, allowed)
    return f"{max(1, memory // 1024)}kB", workers
