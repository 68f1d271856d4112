"""A worker batch reads its rows' state through the state table's primary key, and
writes its rows through the app table's.

The batch read (store.rows.load_pending) joins the app's rows to their state rows. The
planner does not carry the batch's `pk = ANY(keys)` across the join, so it scanned the
whole state table for every 512-row batch: most of the read's Postgres CPU at 100k rows,
and growing with the table (bench.write_cpu). Checked by the scan counters Postgres keeps
for the transaction (pg_stat_xact_user_tables), not by a plan's text.
"""

from __future__ import annotations

import numpy as np
import psycopg
from psycopg import sql

from pgreembed.config import Target, parse_settings
from pgreembed.store.pending import missing_page
from pgreembed.store.pool import connect
from pgreembed.store.rows import load_pending, lock_slot, write_vectors
from pgreembed.store.setup import init_target
from pgreembed.store.slots import Slot, load_slot
from pgreembed.values import Embedded

ROWS = 50_000
BATCH = 512


def _docs(database_url: str, rows: int) -> tuple[Target, Slot]:
    """A `docs` table of `rows` rows, initialized as a target (no vectors yet)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text)")
        conn.execute("INSERT INTO docs SELECT g, 'body ' || g FROM generate_series(1, %s) g",
                     (rows,))
    target = parse_settings({"target": [{
        "name": "docs", "table": "public.docs", "text_column": "body",
        "vector_column": "embedding", "provider": "openai", "model": "fake-384",
        "dimensions": 384}]}, {"DATABASE_URL": database_url}).target("docs")
    return target, init_target(database_url, target)


def test_a_batch_read_does_not_scan_the_state_table(database_url: str) -> None:
    target, slot = _docs(database_url, ROWS)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Every row has a state row (embedded once, by a model replaced since), as after
        # a first fill: every row is pending for this slot's model again.
        conn.execute(sql.SQL(
            "INSERT INTO {} (pgr_pk, pgr_model_id, pgr_hash, pgr_embedded_at)"
            " SELECT id, NULL, md5(body)::uuid, now() FROM docs").format(slot.state_table))
        conn.execute(sql.SQL("ANALYZE docs, {}").format(slot.state_table))
    keys = [str(k) for k in range(ROWS // 2, ROWS // 2 + BATCH)]
    with connect(database_url) as conn:
        slot = load_slot(conn, target, slot.id)
        pending = load_pending(conn, slot, keys)
        scans = conn.execute(
            "SELECT seq_scan, idx_scan FROM pg_stat_xact_user_tables"
            " WHERE relid = %s::regclass",
            (slot.state_table.as_string(conn),)).fetchone()
        conn.rollback()
    assert [str(row.pk) for row in pending] == keys
    assert scans is not None
    seq_scans, index_scans = scans
    assert (seq_scans, index_scans > 0) == (0, True)


PAGE = 1024


def _state_tuples_read(conn: psycopg.Connection, relation: str) -> int:
    """Index and sequential tuples this transaction read from `relation` so far."""
    row = conn.execute(
        "SELECT coalesce(idx_tup_fetch, 0) + seq_tup_read FROM pg_stat_xact_user_tables"
        " WHERE relid = %s::regclass", (relation,)).fetchone()
    assert row is not None
    return int(row[0])


def test_a_sweep_page_reads_no_state_rows_before_its_cursor(database_url: str) -> None:
    """The scheduler's sweep (store.pending) pages through pending keys after a cursor.
    Its join to the state table did not carry the cursor to the state side, so the
    planner's merge join read every state row before the cursor on every page: while the
    workers fill the table behind the sweep, each page read more (68 ms per page at 50k
    written rows, 150 ms at 200k, by EXPLAIN), a full sweep grew with the square of the
    table."""
    target, slot = _docs(database_url, ROWS)
    half = ROWS // 2
    with psycopg.connect(database_url, autocommit=True) as conn:
        # The sweep's cursor is halfway: the rows before it are written (the workers
        # follow the sweep), the rows after it pending; every 10th of those was written
        # once and edited since (a state row, no vector).
        conn.execute("UPDATE docs SET embedding = array_fill(0.5, ARRAY[384])::vector"
                     " WHERE id <= %s", (half,))
        conn.execute(sql.SQL(
            "INSERT INTO {} (pgr_pk, pgr_model_id, pgr_hash, pgr_embedded_at)"
            " SELECT id, %s, md5(body)::uuid, now() FROM docs"
            " WHERE id <= %s OR id %% 10 = 0").format(slot.state_table),
            (slot.model_id, half))
        conn.execute(sql.SQL("VACUUM ANALYZE docs, {}").format(slot.state_table))
    with connect(database_url) as conn:
        state = slot.state_table.as_string(conn)
        slot = load_slot(conn, target, slot.id)
        missing = missing_page(conn, slot, half, PAGE)
        read_missing = _state_tuples_read(conn, state)
        conn.rollback()
    assert missing == list(range(half + 1, half + 1 + PAGE))
    assert read_missing <= PAGE


SLICE = 4


def test_a_write_reads_only_its_rows_of_the_app_table(database_url: str) -> None:
    """The write's `UPDATE ... FROM` goes through the pk, never a scan of the app's
    table: written in slices of a few rows (worker.batch_write), a scan would be paid per
    few rows. (Found when it read a temporary table without statistics: the planner
    guessed 850 rows and, below ~100k rows in the app's table, hashed the whole table.)"""
    target, slot = _docs(database_url, ROWS // 10)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE docs")
    keys = [str(k) for k in range(100, 100 + SLICE)]
    with connect(database_url) as conn:
        slot = load_slot(conn, target, slot.id)
        rows = load_pending(conn, slot, keys)
        conn.commit()
        current = lock_slot(conn, target, slot.id, "ROW EXCLUSIVE")
        assert current is not None
        written = write_vectors(conn, current, [
            Embedded(row, np.full(384, 0.5, dtype=np.float32)) for row in rows])
        scans = conn.execute(
            "SELECT seq_scan, idx_tup_fetch FROM pg_stat_xact_user_tables"
            " WHERE relid = 'public.docs'::regclass").fetchone()
        conn.rollback()
    assert sorted(str(k) for k in written.keys) == keys
    # The rows found through the key (to lock them, to write them), never the table.
    assert scans is not None
    seq_scans, fetched = scans
    assert (seq_scans, fetched <= 3 * SLICE) == (0, True), fetched
