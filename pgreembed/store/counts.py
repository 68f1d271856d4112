"""A column's row counts, cheap at any table size (`status`, the scrape, `migrate status`).

The cheap counts read what is small: failures through the state table's partial index,
outdated vectors through its (model, pk) index, and rows without a vector through the
slot's partial index, one state-row probe each. That last one is proportional to the
backlog, and a migration's backlog is the whole table when it starts (10M rows: 10M
probes every scrape). So past BACKLOG_EXACT_ROWS rows without a vector (found by
walking the partial index that far, no further), those rows are counted in a
TABLESAMPLE SYSTEM of about SAMPLE_ROWS rows (random pages) and scaled to the table's
row estimate: `pending` and `stale` are then estimates, and say so.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.store.slots import Slot
from pgreembed.store.trusted_sql import NO_PARAMS

BACKLOG_EXACT_ROWS = 50_000
SAMPLE_ROWS = 30_000


@dataclass(frozen=True)
class Counts:
    without_vector: int
    pending: int  # without a vector and not failed on its current text
    stale: int  # of those, rows embedded before whose text changed since
    failed: int
    outdated: int  # a vector of another model than the column's
    sampled_percent: float | None = None  # the three above from a sample of pages


def exact_counts(conn: psycopg.Connection, slot: Slot) -> tuple[int, ...]:
    """(total, embedded, pending, stale, outdated, failed, truncated): one scan of the
    table and its state table (seconds per million rows)."""
    row = conn.execute(sql.SQL(
        """
        SELECT count(*),
               count(*) FILTER (WHERE a.{vector} IS NOT NULL),
               count(*) FILTER (WHERE {pending}),
               count(*) FILTER (WHERE {pending} AND s.pgr_hash IS NOT NULL),
               count(*) FILTER (WHERE a.{vector} IS NOT NULL AND s.pgr_model_id <> %s),
               count(*) FILTER (WHERE {failed}),
               count(*) FILTER (WHERE s.pgr_truncated)
        FROM {rows}
        """
    ).format(vector=slot.vector, rows=slot.rows_with_state(outer=True),
             pending=slot.pending(), failed=slot.failed()),
        (slot.model_id,)).fetchone()
    assert row is not None
    return tuple(int(x) for x in row)


def cheap_counts(conn: psycopg.Connection, slot: Slot, estimated_total: int) -> Counts:
    """Counts that never scan the table; `estimated_total` scales a sampled backlog."""
    other_models = [r[0] for r in conn.execute(
        "SELECT id FROM pgreembed.models WHERE id <> %s", (slot.model_id,))]
    names = {"vector": slot.vector, "table": slot.table, "state": slot.state_table,
             "pk": slot.pk, "rows": slot.rows_with_state(), "key": slot.state_key(),
             "failed": slot.failed(), "pending": slot.pending()}
    row = conn.execute(sql.SQL(
        """
        SELECT (SELECT count(*) FROM {rows} WHERE {failed}),
               (SELECT count(*) FROM {rows}
                WHERE s.pgr_model_id = ANY(%(others)s) AND a.{vector} IS NOT NULL),
               -- ORDER BY the key: the partial index, read this far and no further (a
               -- LIMITed seq scan would assume the NULLs spread evenly; a fill leaves
               -- them at one end of the table)
               (SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {vector} IS NULL
                                      ORDER BY {pk} LIMIT %(limit)s) b)
        """).format(**names),
        {"others": other_models, "limit": BACKLOG_EXACT_ROWS + 1}).fetchone()
    assert row is not None
    failed, outdated, backlog = (int(x) for x in row)
    # One state-row probe per row without a vector: as a plain join the planner hashes
    # the whole state table (one row per row of the app's table).
    probe = sql.SQL(
        """
        SELECT count(*), count(*) FILTER (WHERE a.{vector} IS NULL),
               count(*) FILTER (WHERE {pending}),
               count(*) FILTER (WHERE {pending} AND s.pgr_hash IS NOT NULL)
        FROM {table} a {sample}
        LEFT JOIN LATERAL (SELECT s.pgr_hash, s.pgr_failed_hash FROM {state} s
                           WHERE {key} AND a.{vector} IS NULL OFFSET 0) s ON true
        WHERE {where}
        """)
    percent = min(100.0, 100.0 * SAMPLE_ROWS / max(1, estimated_total))
    if backlog > BACKLOG_EXACT_ROWS and percent < 100.0:
        found = conn.execute(probe.format(
            sample=sql.SQL("TABLESAMPLE SYSTEM ({})").format(sql.Literal(percent)),
            where=sql.SQL("TRUE"), **names), NO_PARAMS).fetchone()
        assert found is not None
        seen, nulls, pending, stale = (int(x) for x in found)
        if seen:  # an empty sample (a table of empty pages) cannot be scaled: count
            scale = estimated_total / seen
            without = max(backlog, round(nulls * scale))
            return Counts(without, min(without, round(pending * scale)),
                          min(without, round(stale * scale)), failed, outdated, percent)
    found = conn.execute(probe.format(sample=sql.SQL(""),
                                      where=sql.SQL("a.{} IS NULL").format(slot.vector),
                                      **names), NO_PARAMS).fetchone()
    assert found is not None
    _, without, pending, stale = (int(x) for x in found)
    return Counts(without, pending, stale, failed, outdated)
