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
import functools
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    OrdinaryRoles,
    Stack,
    assert_column_current,
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
    write_config,
)

OLD, NEW = "fake-384", "fake-alt-384"
APP_SLEEP = 0.3  # the app's transaction works this long between its two rows
HELD = 0.2  # an app transaction longer than its own work by this much was held by someone


def repeatable_read_by_default(stack: Stack) -> None:
    """As a DBA may set it: every transaction without its own level is REPEATABLE READ."""
    with stack.connect() as conn:
        conn.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_isolation"
                             " = 'repeatable read'").format(sql.Identifier(conn.info.dbname)))


APP_OBJECTS = """
CREATE VIEW docs_search AS SELECT id, title, body, embedding FROM docs;
CREATE FUNCTION doc_embedding(doc bigint) RETURNS vector LANGUAGE sql STABLE
BEGIN ATOMIC SELECT embedding FROM docs WHERE id = doc; END;
"""


def create_app_objects(stack: Stack, roles: OrdinaryRoles) -> None:
    with stack.connect() as conn:
        conn.execute(APP_OBJECTS)
        conn.execute(sql.SQL("ALTER VIEW docs_search OWNER TO {}").format(
            sql.Identifier(roles.owner)))
        conn.execute(sql.SQL("ALTER FUNCTION doc_embedding(bigint) OWNER TO {}").format(
            sql.Identifier(roles.owner)))
        conn.execute(sql.SQL("GRANT SELECT ON docs_search TO {}").format(
            sql.Identifier(roles.app)))


def assert_app_reads_live(roles: OrdinaryRoles) -> None:
    """The view and the function give, for every row, the live column's vector."""
    with psycopg.connect(roles.app_dsn, autocommit=True) as conn:
        base = dict(conn.execute("SELECT id, embedding::text FROM docs").fetchall())
        view = dict(conn.execute("SELECT id, embedding::text FROM docs_search").fetchall())
        function = dict(conn.execute("SELECT id, doc_embedding(id)::text FROM docs"
                                     ).fetchall())
    assert base and None not in base.values()
    assert [k for k in base if view.get(k) != base[k]] == [], "the view serves another column"
    assert [k for k in base if function.get(k) != base[k]] == [], \
        "the function serves another column"


@dataclasses.dataclass
class AppTransactions:
    """Two-row transactions in descending key order, 4 at a time, as an app runs them
    (each on its own share of the keys: they never wait on each other, only on us)."""

    held: list[float] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    done: int = 0


@contextmanager
def app_transactions(dsn: str, keys: range) -> Iterator[AppTransactions]:
    seen = AppTransactions()
    lock = threading.Lock()

    def run(share: int, stop: threading.Event) -> None:
        rng = random.Random(share)
        mine = [k for k in keys if k % 4 == share]
        with psycopg.connect(dsn) as conn:
            while not stop.is_set():
                low, high = sorted(rng.sample(mine, 2))
                started = time.monotonic()
                try:
                    with conn.transaction():
                        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                        conn.execute("UPDATE docs SET views = views + 1 WHERE id = %s", (high,))
                        time.sleep(APP_SLEEP)  # the scenario: the app holds its rows
                        conn.execute("UPDATE docs SET views = views + 1 WHERE id = %s", (low,))
                except psycopg.Error as exc:
                    with lock:
                        seen.errors.append(f"{exc.sqlstate}: {exc}")
                    continue
                extra = time.monotonic() - started - APP_SLEEP
                with lock:
                    seen.done += 1
                    if extra > HELD:
                        seen.held.append(round(extra, 3))

    with in_background(*[functools.partial(run, share) for share in range(4)]):
        yield seen


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
            time.sleep(2.0)  # the app keeps on while the batches slowed 0.5 s land after it
        settle(stack, fake_openai, "embedding", column)
        assert_column_current(stack, "embedding", live, 384)
        assert_column_current(stack, column, kept, 384)
        assert_app_reads_live(roles)
        assert transactions.done > 10
        assert transactions.errors == [] and transactions.held == []
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
