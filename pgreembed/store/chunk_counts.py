"""A chunked target's counts, cheap at any size (`status`, the scrape, `doctor`).

The status columns of a chunked target count chunks (its rows are the chunk table's);
these say what the operator asks of long documents: how many parents, how many of them
wait for the chunk stage and since when, how many deletes the stage has still to sweep
(gone marks), how many chunks and how many of them wait for a vector. Parents and chunks
are counted exactly up to EXACT_ROWS (a walk that stops there), past that they are the
statistics' estimate and say so; the backlogs are exact (the dirty and gone tables are
small, the pending chunks are read through the chunk table's partial index).
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.store.catalog import estimated_rows
from pgreembed.store.chunks import dirty_table, gone_table, parent_key, parent_target
from pgreembed.store.slots import app_table
from pgreembed.store.trusted_sql import NO_PARAMS

EXACT_ROWS = 100_000


@dataclass(frozen=True)
class ChunkCounts:
    parents: int
    parents_estimated: bool
    parents_to_chunk: int  # marked dirty: the chunk stage makes their chunk set again
    oldest_mark_seconds: float | None  # age of the oldest dirty mark (None: none)
    gone_marks: int  # deletes the stage has still to sweep (REPEATABLE READ deleters)
    chunks: int
    chunks_estimated: bool
    chunks_pending: int  # chunks without a vector in the live column


def _bounded_count(conn: psycopg.Connection, table: sql.Identifier) -> tuple[int, bool]:
    """(rows, estimated): exact up to EXACT_ROWS, else the statistics' live-row count."""
    row = conn.execute(sql.SQL("SELECT count(*) FROM (SELECT FROM {} LIMIT %s) t").format(
        table), (EXACT_ROWS + 1,)).fetchone()
    exact = int(row[0]) if row else 0
    if exact <= EXACT_ROWS:
        return exact, False
    estimate = estimated_rows(conn, table.as_string(conn))
    return (max(exact, estimate or 0), True)


def chunk_counts(conn: psycopg.Connection, target: Target) -> ChunkCounts:
    parents, parents_estimated = _bounded_count(conn, app_table(parent_target(target)))
    chunks, chunks_estimated = _bounded_count(conn, app_table(target))
    row = conn.execute(sql.SQL(
        "SELECT (SELECT count(*) FROM {dirty}),"
        " (SELECT extract(epoch FROM now() - min(pgr_marked_at)) FROM {dirty}),"
        " (SELECT count(*) FROM {gone}),"
        " (SELECT count(*) FROM {chunks} WHERE {vector} IS NULL)").format(
        dirty=dirty_table(target), gone=gone_table(target), chunks=app_table(target),
        vector=sql.Identifier(target.vector_column)), NO_PARAMS).fetchone()
    assert row is not None
    return ChunkCounts(parents, parents_estimated, int(row[0]),
                       None if row[1] is None else max(0.0, float(row[1])), int(row[2]),
                       chunks, chunks_estimated, int(row[3]))


def _orphaned(conn: psycopg.Connection, target: Target) -> sql.Composed:
    return sql.SQL("{chunks} c WHERE NOT EXISTS (SELECT FROM {parent} p"
                   " WHERE {joined})").format(
        chunks=app_table(target), parent=app_table(parent_target(target)),
        joined=parent_key(conn, target).equal("p", "c"))


def orphan_chunks(conn: psycopg.Connection, target: Target, limit: int = 1000) -> int:
    """Chunks whose parent row is gone, counted up to `limit` (one anti-join scan). Some
    are expected while gone marks wait for the stage; others mean a delete the triggers
    did not see (triggers disabled, a replica session)."""
    row = conn.execute(sql.SQL("SELECT count(*) FROM (SELECT FROM {} LIMIT %s) t").format(
        _orphaned(conn, target)), (limit,)).fetchone()
    return int(row[0]) if row else 0


def delete_orphans_sql(conn: psycopg.Connection, target: Target) -> sql.Composed:
    """The statement doctor advises for orphans (not run by pgreembed: the operator's)."""
    return sql.SQL("DELETE FROM {};").format(_orphaned(conn, target))
