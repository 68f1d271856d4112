"""Migrations under live traffic: a steady writer, a slowed provider, batches in flight.

Every test here runs its migration step while a writer keeps inserting and editing rows,
with one model deliberately slowed, and ends by comparing every row's vector, in both
columns, with the exact vector of that column's model for the row's current text.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from pgreembed.config import load_settings
from pgreembed.store.rows import lock_slot
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    Stack,
    assert_column_current,
    counts,
    docs_config,
    in_background,
    json_document,
    migrate,
    rows_in_flight,
    seed,
    start_migration,
    steady_writer,
    wait_filled,
    wait_for,
    wait_landed,
    write_config,
)

OLD, NEW = "fake-384", "fake-alt-384"  # same dimensions: a wrong-model write fits silently


def start_same_dimension_migration(stack: Stack) -> str:
    """Running pipeline on OLD, a migration to NEW started and filled; the new column."""
    write_config(stack.config_path, docs_config(batch_size=16, max_inflight_rows=128))
    seed(stack, 200)
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=8)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    column = start_migration(stack, "--model", NEW, "--dimensions", "384")
    wait_filled(stack, column)
    return column


def settle(stack: Stack, fake: FakeOpenAIServer, *columns: str) -> None:
    fake.set_faults(slow_model=None, slow_model_latency=0.0)
    for column in columns:
        wait_filled(stack, column)
    wait_for(lambda: rows_in_flight(stack) == 0, timeout=60,
             message="the batches in flight to land")
    for column in columns:
        wait_filled(stack, column)


def edit_then(stack: Stack, fake: FakeOpenAIServer, slow: str, step: str) -> dict[str, object]:
    """Slow `slow`, edit 150 rows so both models have batches in flight, then run `step`."""
    fake.set_faults(slow_model=slow, slow_model_latency=3.0)
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'edited ' || id WHERE id <= 150")
    wait_for(lambda: rows_in_flight(stack, slow) > 0, timeout=30,
             message=f"batches of the slowed {slow} in flight")
    result: dict[str, object] = json.loads(migrate(stack, step, "--json", "--timeout", "60"))
    return result


@pytest.mark.second_server
def test_no_wrong_model_vector_when_batches_race_a_swap_and_a_rollback(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    column = start_same_dimension_migration(stack)
    with steady_writer(stack) as writes:
        # OLD's batches sleep on the provider across the swap: their vectors must land in
        # OLD's column, which is now `column`, not in `embedding`.
        swapped = edit_then(stack, fake_openai, OLD, "swap")
        assert swapped["step"] == "swap"
        # The writer keeps on while the batches slowed 3 s land after the swap.
        wait_landed(stack, OLD, time.time(), also=lambda: writes["edits"] > 20)
    settle(stack, fake_openai, "embedding", column)
    assert_column_current(stack, "embedding", NEW, 384)
    assert_column_current(stack, column, OLD, 384)

    with steady_writer(stack) as writes_back:
        rolled = edit_then(stack, fake_openai, NEW, "rollback")
        assert rolled["step"] == "rollback"
        # The writer keeps on while the batches slowed 3 s land after the step.
        wait_landed(stack, NEW, time.time(), also=lambda: writes_back["edits"] > 20)
    settle(stack, fake_openai, "embedding", column)
    assert_column_current(stack, "embedding", OLD, 384)
    assert_column_current(stack, column, NEW, 384)
    assert writes["edits"] > 20 and writes_back["edits"] > 20
    assert writes["errors"] == writes_back["errors"] == 0


@pytest.mark.second_server
def test_swap_converges_under_steady_writes(stack: Stack, fake_openai: FakeOpenAIServer
                                            ) -> None:
    """Zero rows without an incoming vector never happens under steady writes; the swap
    waits only for rows that would stop being searchable."""
    column = start_same_dimension_migration(stack)
    fake_openai.set_faults(slow_model=NEW, slow_model_latency=0.3)
    with steady_writer(stack, per_second=30.0) as writes:
        wait_for(lambda: writes["edits"] >= 30 and rows_in_flight(stack, NEW) > 0,
                 timeout=30, message="steady writes with the slowed model's batches in flight")
        started = time.monotonic()
        swapped = json.loads(migrate(stack, "swap", "--json", "--timeout", "30"))
        assert time.monotonic() - started < 15
        assert swapped["unsearchable"] <= 100
        time.sleep(1.0)  # the scenario: the swapped columns serve a while under the writes
        rolled = json.loads(migrate(stack, "rollback", "--json", "--timeout", "30"))
        assert rolled["unsearchable"] <= 100
    settle(stack, fake_openai, "embedding", column)
    assert_column_current(stack, "embedding", OLD, 384)
    assert_column_current(stack, column, NEW, 384)


def test_rollback_when_the_live_column_had_no_index(stack: Stack, fake_openai: FakeOpenAIServer
                                                    ) -> None:
    column = start_same_dimension_migration(stack)  # `embedding` has no ANN index
    migrate(stack, "index")  # the new column gets one
    with steady_writer(stack):
        fake_openai.set_faults(slow_model=NEW, slow_model_latency=0.5)
        migrate(stack, "swap", "--timeout", "60")
        migrate(stack, "rollback", "--timeout", "60")
    with stack.connect() as conn:
        indexed = {r[0] for r in conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " JOIN pg_am am ON am.oid = c.relam JOIN pg_attribute a ON a.attrelid = i.indrelid"
            " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'docs'::regclass"
            " AND am.amname = 'hnsw'")}
    assert indexed == {column}  # as before the migration: only the new column has one
    settle(stack, fake_openai, "embedding", column)
    assert_column_current(stack, "embedding", OLD, 384)
    assert_column_current(stack, column, NEW, 384)


def test_rows_failed_in_the_new_column_stop_the_swap_unless_accepted(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    write_config(stack.config_path, docs_config(batch_size=16, max_inflight_rows=128))
    seed(stack, 60)
    with stack.connect() as conn:  # searchable now; the new model will refuse them
        conn.execute("UPDATE docs SET body = 'poison ' || id WHERE id IN (5, 6, 7)")
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    fake_openai.set_faults(bad_input_marker="poison")
    column = start_migration(stack, "--model", NEW, "--dimensions", "384")
    with stack.connect() as conn:
        wait_for(lambda: conn.execute(f"SELECT count(*) FROM docs WHERE {column} IS NULL"
                                      ).fetchone()[0] == 3, timeout=60)
    fake_openai.set_faults(slow_model=NEW, slow_model_latency=0.3)
    with steady_writer(stack, per_second=5.0, edits=range(10, 61)):
        refused = stack.cli("migrate", "swap", "--target", "docs", "--timeout", "30")
        assert refused.returncode == 4
        assert counts(rf"(\d+) rows searchable now failed to embed in {column}\b",
                      refused.stderr) == [(3,)], refused.stderr
        assert f"pgreembed failures --target docs --column {column}" in refused.stderr
        listed = json_document(stack.cli("failures", "--target", "docs", "--column", column,
                                         "--json").stdout)["failures"]
        assert sorted(int(f["key"]) for f in listed) == [5, 6, 7]
        swapped = json.loads(migrate(stack, "swap", "--accept-failed", "--json",
                                     "--timeout", "30"))
        assert swapped["step"] == "swap"
    fake_openai.set_faults(bad_input_marker=None, slow_model=None)
    with stack.connect() as conn:  # the three rows are out of search until their text changes
        assert conn.execute("SELECT count(*) FROM docs WHERE embedding IS NULL AND id IN"
                            " (5, 6, 7)").fetchone() == (3,)


@contextmanager
def writers_always_in_flight(stack: Stack, slot_id: int, hold: float = 0.6
                             ) -> Iterator[dict[str, int]]:
    """Two writers overlapping like workers on an HNSW-indexed table at scale (a batch's
    write holds ROW EXCLUSIVE for seconds there): at every moment one holds the table.
    They enter through the workers' own write path (`store.rows.lock_slot`)."""
    settings = load_settings(stack.config_path, stack.env)
    target = settings.target("docs")
    counts = {"writes": 0}

    def run(stop: threading.Event, offset: float) -> None:
        stop.wait(offset)
        with psycopg.connect(stack.dsn) as conn:
            while not stop.is_set():
                assert lock_slot(conn, target, slot_id, "ROW EXCLUSIVE") is not None
                stop.wait(hold)
                conn.commit()
                counts["writes"] += 1

    with in_background(*(functools.partial(run, offset=i * hold / 2) for i in range(2))):
        yield counts


@pytest.mark.second_server
def test_swap_gets_its_lock_while_worker_writes_are_always_in_flight(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """With a few workers one write is always in flight: 100 ms lock attempts alone never get
    through (the 500k-row HNSW bench gave up after 60 s); the swap holds our writers out."""
    column = start_same_dimension_migration(stack)
    fake_openai.set_faults(slow_model=NEW, slow_model_latency=0.2)
    with stack.connect() as conn:
        live = conn.execute("SELECT id FROM pgreembed.slots WHERE role = 'live'").fetchone()[0]
    with steady_writer(stack), writers_always_in_flight(stack, live) as writes:
        wait_for(lambda: writes["writes"] >= 2, timeout=30,
                 message="both writers holding the table in turn")
        started = time.monotonic()
        out = stack.cli("migrate", "swap", "--target", "docs", "--json", "--lock-wait", "15",
                        timeout=120)
        took = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["step"] == "swap"
    assert took < 15 and writes["writes"] > 3
    settle(stack, fake_openai, "embedding", column)
    assert_column_current(stack, "embedding", NEW, 384)
    assert_column_current(stack, column, OLD, 384)


def restart_pipeline(stack: Stack) -> None:
    """Stop the worker and the scheduler (SIGTERM, graceful) and start them again: their
    new sessions get the database's defaults as they are now."""
    running = [p for p in stack.processes if p.poll() is None]
    for process in running:
        process.terminate()
    for process in running:
        process.wait(30)
    stack.start_worker(threads=8)
    stack.start_scheduler()


def test_database_isolation_defaults_change_nothing(stack: Stack,
                                                    fake_openai: FakeOpenAIServer) -> None:
    """A database default of REPEATABLE READ (for the swap), then SERIALIZABLE (for the
    rollback), as a DBA may set: our sessions pin READ COMMITTED, so a write that waited
    on the swap's lock reads the registry as the swap left it (invariant 7)."""
    with stack.connect() as conn:
        dbname = conn.info.dbname
        conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_isolation'
                     " = 'repeatable read'")
    column = start_same_dimension_migration(stack)
    with steady_writer(stack):
        assert edit_then(stack, fake_openai, OLD, "swap")["step"] == "swap"
        # The writer keeps on while the batches slowed 3 s land after the swap.
        wait_landed(stack, OLD, time.time())
    settle(stack, fake_openai, "embedding", column)
    assert_column_current(stack, "embedding", NEW, 384)
    assert_column_current(stack, column, OLD, 384)

    with stack.connect() as conn:
        conn.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_isolation'
                     " = 'serializable'")
    restart_pipeline(stack)
    with steady_writer(stack):
        assert edit_then(stack, fake_openai, NEW, "rollback")["step"] == "rollback"
        # The writer keeps on while the batches slowed 3 s land after the step.
        wait_landed(stack, NEW, time.time())
    settle(stack, fake_openai, "embedding", column)
    assert_column_current(stack, "embedding", OLD, 384)
    assert_column_current(stack, column, NEW, 384)
    assert "Traceback" not in stack.log_text()
