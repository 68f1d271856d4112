"""A new row of the live column is embedded ahead of a migration's queued batches: the
migration's (and a side fill's) batches go on the backfill queue, by an actor of a lower
priority (pgreembed.queue.contract). On one queue a new row's batch waited behind every
migration batch already queued (a new-user probe measured 10-120 s to its live vector
during a migration, 0.2 s without one)."""

from __future__ import annotations

import dataclasses

import pytest

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.app_side import (
    app_transactions,
    assert_app_reads_live,
    create_app_objects,
    repeatable_read_by_default,
)
from tests.helpers import (
    OrdinaryRoles,
    Stack,
    assert_column_current,
    docs_config,
    migrate,
    new_column,
    rows_in_flight,
    seed,
    steady_writer,
    wait_filled,
    wait_for,
    write_config,
)

OLD, NEW = "fake-384", "fake-alt-384"
QUEUED = 160  # [worker] max_inflight_rows: 20 migration batches of 8 rows in flight


def vectors_in(stack: Stack, column: str) -> int:
    with stack.connect() as conn:
        row = conn.execute(f"SELECT count({column}) FROM docs").fetchone()
    assert row is not None
    return int(row[0])


def live_vector_of(stack: Stack, key: int) -> bool:
    with stack.connect() as conn:
        row = conn.execute("SELECT embedding IS NOT NULL FROM docs WHERE id = %s",
                           (key,)).fetchone()
    return bool(row and row[0])


@pytest.mark.timeout(300)
def test_a_new_live_row_goes_ahead_of_a_migrations_queued_batches(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    stack, roles = ordinary_roles
    repeatable_read_by_default(stack)
    write_config(stack.config_path, docs_config(batch_size=8, max_inflight_rows=QUEUED))
    seed(stack, 300)
    assert stack.cli("init").returncode == 0
    create_app_objects(stack, roles)
    stack.start_worker(threads=2)
    stack.start_scheduler()
    wait_filled(stack, "embedding")

    fake_openai.set_faults(slow_model=NEW, slow_model_latency=0.5)  # 2 threads: 32 rows/s
    migrate(stack, "start", "--model", NEW, "--dimensions", "384")
    column = new_column(stack)
    app = dataclasses.replace(stack, dsn=roles.app_dsn)
    with steady_writer(app, per_second=2.0, edits=range(1, 41)) as writes, \
            app_transactions(roles.app_dsn, range(41, 81)) as transactions:
        wait_for(lambda: rows_in_flight(stack, NEW) >= QUEUED - 16, timeout=60,
                 message="the migration's batches queued")
        before = vectors_in(stack, column)
        with stack.connect() as conn:
            row = conn.execute("INSERT INTO docs (title, body) VALUES ('fresh', 'a new row')"
                               " RETURNING id").fetchone()
        assert row is not None
        wait_for(lambda: live_vector_of(stack, int(row[0])), timeout=60, interval=0.05,
                 message="the new row's live vector")
        # Migration rows written meanwhile: the batches the 2 threads had already begun
        # (and a few more as the live batch is fetched), not the ~20 queued before it.
        meanwhile = vectors_in(stack, column) - before
        assert meanwhile < QUEUED // 2, meanwhile
        fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
        wait_filled(stack, column)
    assert writes["errors"] == 0 and transactions.errors == []
    wait_filled(stack, "embedding")
    assert_column_current(stack, "embedding", OLD, 384)
    assert_column_current(stack, column, NEW, 384)
    assert_app_reads_live(roles)
