"""Derived migrations: a shorter column made from the live vectors, no provider call
(issue 16.2), through the usual index / swap / rollback under a concurrent writer."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from pgreembed.store import server_versions
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    Stack,
    assert_column_current,
    column_type,
    docs_config,
    in_background,
    migrate,
    require_server,
    running,
    seed,
    start_migration,
    steady_writer,
    wait_filled,
    write_config,
)


@pytest.mark.second_server
def test_derived_dimensions_cost_nothing_and_are_what_the_provider_returns(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    require_server(stack.dsn, server_versions.DERIVE_DIMENSIONS)
    seed(stack, 200)
    running(stack)
    wait_filled(stack, "embedding")

    plan = stack.cli("migrate", "plan", "--target", "docs", "--derive", "dimensions:128",
                     "--json")
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert (planned["cost_usd"], planned["provider_inputs"]) == (0.0, 0)
    assert planned["column_type"] == "vector(128)"
    assert planned["storage_saved_bytes"] == 200 * (384 - 128) * 4

    fake_openai.reset()
    new_column = start_migration(stack, "--derive", "dimensions:128")
    assert fake_openai.stats()["requests"] == 0  # filled in SQL
    assert column_type(stack, new_column) == "vector(128)"
    # The provider's own vector at dimensions=128, for every row.
    assert_column_current(stack, new_column, "fake-384", 128)
    with stack.connect() as conn:
        assert conn.execute("SELECT m.key, g.derived FROM pgreembed.migrations g JOIN"
                            " pgreembed.slots s ON s.id = g.to_slot JOIN pgreembed.models m"
                            " ON m.id = s.model_id").fetchone() == (
            "openai:fake-384@128", "dimensions:128 of openai:fake-384@384")

    # Later rows: embedded by the provider at 128 (an insert and an edit, 25 times a second).
    with steady_writer(stack, per_second=25.0) as writes:
        migrate(stack, "index")
        migrate(stack, "swap", "--max-unsearchable", "1000")
        assert column_type(stack, "embedding") == "vector(128)"
        migrate(stack, "rollback")
        assert column_type(stack, "embedding") == "vector(384)"
    assert writes["edits"] + writes["inserts"] > 20
    wait_filled(stack, "embedding")
    wait_filled(stack, new_column)
    assert_column_current(stack, "embedding", "fake-384", 384)
    assert_column_current(stack, new_column, "fake-384", 128)


@pytest.mark.second_server
def test_derive_is_refused_for_a_size_it_cannot_shorten_to(stack: Stack) -> None:
    seed(stack, 3)
    assert stack.cli("init").returncode == 0
    for spec, reason in (("dimensions:384", "must be below the live column's 384"),
                         ("binary", "binary (bit) columns are not implemented"),
                         ("halfvec:1", "supported are dimensions:D and halfvec")):
        result = stack.cli("migrate", "start", "--target", "docs", "--derive", spec)
        assert result.returncode != 0
        assert reason in result.stderr


@contextmanager
def parallel_workers_seen(stack: Stack) -> Iterator[dict[str, int]]:
    """The most parallel workers of a CREATE INDEX seen at once in this database
    (`["most"]`), polled every 10 ms on a connection of its own (pg_stat_activity's
    leader_pid)."""
    seen = {"most": 0}

    def poll(stop: threading.Event) -> None:
        with stack.connect() as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity w JOIN pg_stat_activity l"
                    " ON l.pid = w.leader_pid WHERE w.backend_type = 'parallel worker'"
                    " AND w.datname = current_database() AND l.query LIKE 'CREATE INDEX%'"
                ).fetchone()
                seen["most"] = max(seen["most"], int(row[0]) if row else 0)
                stop.wait(0.01)

    with in_background(poll):
        yield seen


def test_the_index_build_gets_the_parallel_workers_it_is_given(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """The vectors are TOASTed, so the heap looks small and Postgres' planner gave the
    build no worker whatever max_parallel_maintenance_workers said (58-61 s instead of 29 s
    for 20k x 1536 on 2 cores, bench.index_workers). Under a writer and a slowed provider."""
    write_config(stack.config_path, docs_config() + "\n[side_fill]\nenabled = false\n")
    seed(stack, 3000)
    with stack.connect() as conn:  # TOASTed as 1536-dim vectors are, at 384 dims
        conn.execute("ALTER TABLE docs SET (toast_tuple_target = 128)")
    running(stack)
    wait_filled(stack, "embedding")
    new_column = start_migration(stack, "--derive", "dimensions:256")
    with stack.connect() as conn:  # the premise: a heap below min_parallel_table_scan_size
        row = conn.execute("SELECT pg_relation_size('docs') < pg_size_bytes("
                           "current_setting('min_parallel_table_scan_size'))").fetchone()
        assert row == (True,)

    fake_openai.set_faults(slow_model="fake-384", slow_model_latency=0.3)
    with steady_writer(stack, per_second=25.0) as writes:
        with parallel_workers_seen(stack) as serial:
            migrate(stack, "index", "--parallel-workers", "0")
        with stack.connect() as conn:
            name = conn.execute(
                "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
                " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                " WHERE i.indrelid = 'docs'::regclass AND a.attname = %s", (new_column,)
            ).fetchone()
            assert name is not None
            conn.execute(f'DROP INDEX "{name[0]}"')
        with parallel_workers_seen(stack) as default:  # the server's setting: 2
            migrate(stack, "index")
        migrate(stack, "swap", "--max-unsearchable", "1000")
    fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
    assert (serial["most"], default["most"] >= 1) == (0, True), (serial, default)
    assert writes["edits"] + writes["inserts"] > 20
    wait_filled(stack, "embedding")
    wait_filled(stack, new_column)
    assert_column_current(stack, "embedding", "fake-384", 256)
    assert_column_current(stack, new_column, "fake-384", 384)
