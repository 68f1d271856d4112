"""pgreembed behind a real connection pooler in transaction mode (PgBouncer), as on
Supabase, Neon or behind RDS Proxy: consecutive transactions of one client connection run
on different server sessions, so nothing the write path needs may live in a session.

The workers run through it; the scheduler and `init` reach Postgres directly (the
documented exception: the leader lock, LISTEN, the index build's session lock), and an
index build tried through it refuses, naming the pooler, instead of leaving its lock on a
server session. Everything else is the user's database: an ordinary role, REPEATABLE READ
by default, the app's view and function, app transactions holding rows, a steady writer
and a slowed provider.
"""

from __future__ import annotations

import dataclasses
import time

import psycopg

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
from tests.pooler import SERVER_CONNECTIONS, requires_pgbouncer, transaction_pooler

MODEL, NEW = "fake-384", "fake-alt-384"
ANN_INDEX = "pgreembed_ann_2"  # `migrate index`'s build for the new column (slot 2)
THROTTLE = """
[throttle]
max_rows_per_second = 1000
adaptive = true
max_probe_ms = 200
probe_interval = 0.2
"""


def pooled_settings(dsn: str) -> dict[str, set[str]]:
    """The settings every server session behind the pooler answers with (round robin: two
    statements per session reach them all)."""
    seen: dict[str, set[str]] = {"statement_timeout": set(),
                                 "default_transaction_read_only": set()}
    # psycopg's own prepared statements (after 5 runs) would not survive the pooler.
    with psycopg.connect(dsn, autocommit=True, prepare_threshold=None) as conn:
        for _ in range(2 * SERVER_CONNECTIONS):
            for name, values in seen.items():
                row = conn.execute("SELECT current_setting(%s)", (name,)).fetchone()
                assert row is not None
                values.add(row[0])
    return seen


def users_database(stack: Stack, roles: OrdinaryRoles, rows: int, config_extra: str = ""
                   ) -> Stack:
    """REPEATABLE READ by default, `rows` rows, `init` run, the app's view and function;
    the stack as the app (its role) for the steady writer."""
    repeatable_read_by_default(stack)
    write_config(stack.config_path, docs_config(batch_size=8, max_inflight_rows=64)
                 + config_extra)
    seed(stack, rows)
    init = stack.cli("init")
    assert init.returncode == 0, init.stdout + init.stderr
    create_app_objects(stack, roles)
    return dataclasses.replace(stack, dsn=roles.app_dsn)


@requires_pgbouncer
def test_workers_write_through_a_transaction_mode_pooler(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    stack, roles = ordinary_roles
    # The adaptive throttle's probes run on the workers' own connection, through the
    # pooler too, with their statement timeout.
    app = users_database(stack, roles, 120, THROTTLE)
    with stack.connect() as conn:
        dbname = conn.info.dbname
    with transaction_pooler(roles.pgreembed_dsn) as pooler:
        pooled = dataclasses.replace(stack, env={**stack.env, "DATABASE_URL": pooler.dsn})
        worker = pooled.start_worker(threads=4)  # 4 pooled connections, 2 server ones
        stack.start_scheduler()
        wait_filled(stack, "embedding")
        assert_column_current(stack, "embedding", MODEL, 384)

        fake_openai.set_faults(slow_model=MODEL, slow_model_latency=0.5)
        with steady_writer(app, per_second=10.0, edits=range(1, 101)) as written, \
                app_transactions(roles.app_dsn, range(1, 101)) as transactions:
            wait_for(lambda: rows_in_flight(stack, MODEL) > 0, timeout=30,
                     message="batches of the slowed model in flight")
            wait_landed(stack, MODEL, time.time(),
                        also=lambda: transactions.done > 10 and written["edits"] > 20)
        fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
        wait_filled(stack, "embedding")
        assert_column_current(stack, "embedding", MODEL, 384)
        assert_app_reads_live(roles)
        assert transactions.errors == [] and transactions.held == [], transactions
        # The workers' transactions went through the pooler, not around it.
        assert pooler.transactions(dbname) > 50, pooler.log()[-2000:]
        with stack.connect() as conn:
            failed = conn.execute("SELECT count(*) FROM pgreembed.slot_1"
                                  " WHERE pgr_failed_hash IS NOT NULL").fetchone()
        assert failed == (0,)
        worker.terminate()  # before the pooler goes: its connections end cleanly
        worker.wait(30)
        log = stack.log_text()
        assert "Traceback" not in log and "deadlock detected" not in log, log[-3000:]
        # Nothing the workers set stayed on a pooled server session for the next client.
        assert pooled_settings(pooler.dsn) == {"statement_timeout": {"0"},
                                               "default_transaction_read_only": {"off"}}


@requires_pgbouncer
def test_an_index_build_through_a_transaction_mode_pooler_refuses_and_leaves_no_lock(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    stack, roles = ordinary_roles
    app = users_database(stack, roles, 60)
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    fake_openai.set_faults(slow_model=NEW, slow_model_latency=0.5)
    column = start_migration(stack, "--model", NEW, "--dimensions", "384")
    wait_filled(stack, column)
    with steady_writer(app, per_second=10.0, edits=range(1, 61)), \
            app_transactions(roles.app_dsn, range(1, 61)) as transactions:
        with transaction_pooler(roles.pgreembed_dsn) as pooler:
            pooled = dataclasses.replace(stack, env={**stack.env, "DATABASE_URL": pooler.dsn})
            refused = pooled.cli("migrate", "index", "--target", "docs")
            assert refused.returncode == 2, refused.stdout + refused.stderr
            assert "transaction mode" in refused.stderr and "session mode" in refused.stderr
            with stack.connect() as conn:
                # No build began, and its lock went back (not left on a pooled session).
                assert conn.execute("SELECT to_regclass(%s)",
                                    (f"public.{ANN_INDEX}",)).fetchone() == (None,)
                assert conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND"
                    " ((classid::bigint << 32) | objid::bigint) = hashtextextended(%s, 0)",
                    (f"pgreembed.index_build:public.{ANN_INDEX}",)).fetchone() == (0,)
        # Directly, as the message says: built at once (no lock left to wait for).
        migrate(stack, "index")
        assert transactions.errors == [] and transactions.held == [], transactions
    fake_openai.set_faults(slow_model=None, slow_model_latency=0.0)
    wait_filled(stack, column)
    wait_filled(stack, "embedding")  # the writer's last edits, re-embedded in the live one
    assert_column_current(stack, column, NEW, 384)
    assert_column_current(stack, "embedding", MODEL, 384)
    assert_app_reads_live(roles)


@requires_pgbouncer
def test_doctor_through_a_transaction_mode_pooler_names_it_and_leaves_no_setting(
        ordinary_roles: tuple[Stack, OrdinaryRoles]) -> None:
    """doctor's read-only session guard, set through a transaction-mode pooler, would stay
    on a pooled server session and fail the workers' writes there."""
    stack, roles = ordinary_roles
    repeatable_read_by_default(stack)
    seed(stack, 20)
    init = stack.cli("init")
    assert init.returncode == 0, init.stdout + init.stderr
    with transaction_pooler(roles.pgreembed_dsn) as pooler:
        pooled = dataclasses.replace(stack, env={**stack.env, "DATABASE_URL": pooler.dsn})
        doctor = pooled.cli("doctor", "--json")
        findings = json_document(doctor.stdout)["findings"]
        found = [f for f in findings if f["check"] == "pooler"]
        assert [f["level"] for f in found] == ["warn"], doctor.stdout
        assert "transaction mode" in found[0]["message"]
        # Every server session the workers would be handed is as it was: writable, no
        # statement timeout of doctor's.
        assert pooled_settings(pooler.dsn) == {"statement_timeout": {"0"},
                                               "default_transaction_read_only": {"off"}}


@requires_pgbouncer
def test_the_scheduler_refuses_a_transaction_mode_pooler(
        ordinary_roles: tuple[Stack, OrdinaryRoles]) -> None:
    """Its leader lock and LISTEN need one session: through the pooler a second replica's
    lock could land on the session already holding it (re-entrant: two leaders)."""
    stack, roles = ordinary_roles
    seed(stack, 5)
    init = stack.cli("init")
    assert init.returncode == 0, init.stdout + init.stderr
    with transaction_pooler(roles.pgreembed_dsn) as pooler:
        pooled = dataclasses.replace(stack, env={**stack.env, "DATABASE_URL": pooler.dsn})
        refused = pooled.cli("scheduler", timeout=60)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "the scheduler (its leader lock and LISTEN) needs a database session" \
            in refused.stderr
        assert "transaction mode" in refused.stderr
