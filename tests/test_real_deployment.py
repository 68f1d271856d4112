"""The database users run, end to end: an ordinary role, REPEATABLE READ by default, an app
that reads vectors through a view and a SQL function and holds rows in multi-row
transactions.

One scenario under a steady writer and a slowed provider: the pipeline fills, a migration
to another model of the same size (a wrong-model vector fits silently) starts, fills, is
indexed, swapped, rolled back, swapped again and finalized. After every step each row's
vector is the live model's vector for its current text, in the table, through the view and
through the function; no app transaction waited on our row locks; no deadlock.
"""

from __future__ import annotations

import dataclasses
import time

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

OLD, NEW = "fake-384", "fake-alt-384"
def settle(stack: Stack, fake: FakeOpenAIServer, *columns: str) -> None:
    fake.set_faults(slow_model=None, slow_model_latency=0.0)
    for column in columns:
        wait_filled(stack, column)


@pytest.mark.second_server
def test_the_whole_lifecycle_on_a_managed_database(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    stack, roles = ordinary_roles  # pgreembed's processes run as the ordinary role
    repeatable_read_by_default(stack)
    app = dataclasses.replace(stack, dsn=roles.app_dsn)  # the writer runs as the app
    write_config(stack.config_path, docs_config(batch_size=8, max_inflight_rows=64))
    seed(stack, 120)
    init = stack.cli("init")
    assert init.returncode == 0, init.stdout + init.stderr
    create_app_objects(stack, roles)  # on the column init added
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    assert_app_reads_live(roles)

    fake_openai.set_faults(slow_model=NEW, slow_model_latency=0.5)
    column = start_migration(stack, "--model", NEW, "--dimensions", "384")
    wait_filled(stack, column)
    migrate(stack, "index")
    live, kept = NEW, OLD
    for step in ("swap", "rollback", "swap"):
        fake_openai.set_faults(slow_model=kept, slow_model_latency=0.5)
        with steady_writer(app, per_second=10.0, edits=range(1, 101)), \
                app_transactions(roles.app_dsn, range(1, 101)) as transactions:
            wait_for(lambda kept=kept: rows_in_flight(stack, kept) > 0, timeout=30,
                     message=f"batches of the slowed {kept} in flight")
            done = json_document(migrate(stack, step, "--json", "--timeout", "60"))
            assert done["step"] == step
            # The app keeps on while the batches of the slowed model land after the step.
            wait_landed(stack, kept, time.time(),
                        also=lambda transactions=transactions: transactions.done > 10)
        settle(stack, fake_openai, "embedding", column)
        assert_column_current(stack, "embedding", live, 384)
        assert_column_current(stack, column, kept, 384)
        assert_app_reads_live(roles)
        assert transactions.done > 10
        assert transactions.errors == [] and transactions.held == [], transactions
        live, kept = kept, live

    with steady_writer(app, per_second=10.0, edits=range(1, 101)):
        migrate(stack, "finalize")
    settle(stack, fake_openai, "embedding")
    assert_column_current(stack, "embedding", NEW, 384)
    assert_app_reads_live(roles)
    with stack.connect() as conn:
        deadlocks = conn.execute("SELECT deadlocks FROM pg_stat_database"
                                 " WHERE datname = current_database()").fetchone()
    assert deadlocks == (0,)
    log = stack.log_text()
    assert "deadlock detected" not in log and "Traceback" not in log
