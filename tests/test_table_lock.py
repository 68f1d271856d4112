"""DDL on the app's table never stalls the app: short lock attempts, retried, blockers named.

Each test keeps a writer running against the table and measures its statements' latency
while an app session holds the table in a transaction.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    Stack,
    assert_column_current,
    docs_config,
    in_background,
    new_column,
    seed,
    start_migration,
    wait_filled,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.second_server  # also run on PostgreSQL 15 by .ci/run


@contextmanager
def timed_writer(stack: Stack) -> Iterator[list[float]]:
    """Updates an unrelated column every 10 ms; yields the list of its latencies."""
    latencies: list[float] = []

    def run(stop: threading.Event) -> None:
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            i = 0
            while not stop.is_set():
                i += 1
                started = time.monotonic()
                conn.execute("UPDATE docs SET views = views + 1 WHERE id = %s", (i % 20 + 1,))
                latencies.append(time.monotonic() - started)
                stop.wait(0.01)

    with in_background(run):
        yield latencies


def _sessions_named(stack: Stack, application_name: str) -> int:
    with stack.connect() as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (application_name,)).fetchone()
    return int(row[0]) if row else 0


def idle_in_transaction(stack: Stack, statement: str, seconds: float) -> psycopg.Connection:
    """An app session that ran `statement` and then sits idle in its transaction until
    `seconds` after another session first waited for a lock on docs (so a slow-starting
    command still meets it), or 60 s if nobody does."""
    conn = psycopg.connect(stack.dsn, application_name="app-report-job")
    conn.execute(statement)

    def end() -> None:
        deadline = time.monotonic() + 60
        with contextlib.suppress(psycopg.Error), stack.connect() as watcher:
            while not conn.closed and time.monotonic() < deadline and not watcher.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"
                    " AND relation = 'docs'::regclass").fetchone()[0]:
                time.sleep(0.02)  # a poll (in its own thread: no wait_for failing the test)
        time.sleep(seconds)  # the scenario: the reader stays idle this long
        with contextlib.suppress(psycopg.Error):
            conn.rollback()

    threading.Thread(target=end, daemon=True).start()
    return conn


def test_migrate_start_waits_behind_an_idle_reader_without_stalling_writers(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    seed(stack, 40)
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    fake_openai.set_faults(slow_model="fake-768", slow_model_latency=0.5)
    with timed_writer(stack) as latencies:
        wait_for(lambda: len(latencies) >= 20, timeout=30, message="the app's writer running")
        # ADD COLUMN needs ACCESS EXCLUSIVE: the idle reader's ACCESS SHARE blocks it for 3 s.
        reader = idle_in_transaction(stack, "SELECT count(*) FROM docs", 3.0)
        started = time.monotonic()
        out = stack.cli("migrate", "start", "--target", "docs", "--model", "fake-768",
                        "--dimensions", "768")
        took = time.monotonic() - started
        written = len(latencies)  # a write stalled behind a lock is recorded once it ends
        wait_for(lambda: len(latencies) >= written + 20, timeout=30,
                 message="the app's writer going on after the command")
    reader.close()
    assert out.returncode == 0, out.stderr
    assert took >= 2.5  # it waited for the reader...
    assert "app-report-job, idle in transaction" in out.stderr  # ...naming it
    # ...and no write waited behind a lock attempt for more than one attempt (100 ms) plus
    # scheduling noise; an unbounded wait would have stalled the writer ~3 s.
    assert max(latencies) < 0.6, sorted(latencies)[-5:]
    column = new_column(stack)
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'edited while filling' WHERE id <= 5")
    wait_filled(stack, column)
    wait_filled(stack, "embedding")
    assert_column_current(stack, "embedding", "fake-384", 384)
    assert_column_current(stack, column, "fake-768", 768)


def test_init_rerun_takes_no_lock_when_nothing_changed(stack: Stack) -> None:
    seed(stack, 5)
    assert stack.cli("init").returncode == 0
    # An app transaction that wrote a row and went idle holds ROW EXCLUSIVE: re-creating
    # the triggers (SHARE ROW EXCLUSIVE) would wait for it; nothing changed, so none is.
    writer = idle_in_transaction(stack, "UPDATE docs SET views = 1 WHERE id = 1", 30.0)
    started = time.monotonic()
    out = stack.cli("init", "--lock-wait", "20", timeout=60)
    writer.close()
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - started < 10
    assert "table busy" not in out.stderr


def test_init_gives_up_naming_the_blocker_and_changes_nothing(stack: Stack) -> None:
    seed(stack, 5)
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        before = conn.execute("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE"
                              " tgrelid = 'docs'::regclass ORDER BY tgname").fetchall()
    # A changed text column list means new triggers, which the idle writer blocks.
    write_config(stack.config_path, docs_config().replace('["title", "body"]', '["body"]'))
    writer = idle_in_transaction(stack, "UPDATE docs SET views = 1 WHERE id = 1", 30.0)
    with timed_writer(stack) as latencies:
        out = stack.cli("init", "--lock-wait", "2", timeout=60)
    writer.close()
    assert out.returncode == 4  # blocked: the table stayed locked
    assert "could not init: the table stayed busy" in out.stderr
    assert "app-report-job, idle in transaction" in out.stderr
    assert max(latencies) < 0.6, sorted(latencies)[-5:]
    with stack.connect() as conn:
        after = conn.execute("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE"
                             " tgrelid = 'docs'::regclass ORDER BY tgname").fetchall()
    assert after == before
    assert stack.cli("init").returncode == 0  # once the session is gone, it goes through


def test_swap_ends_an_idle_transaction_only_when_asked(stack: Stack,
                                                       fake_openai: FakeOpenAIServer) -> None:
    seed(stack, 30)
    write_config(stack.config_path, docs_config())
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    column = start_migration(stack, "--model", "fake-alt-384", "--dimensions", "384")
    wait_filled(stack, column)
    fake_openai.set_faults(slow_model="fake-alt-384", slow_model_latency=0.5)
    reader = idle_in_transaction(stack, "SELECT count(*) FROM docs", 120.0)
    with timed_writer(stack) as latencies:
        refused = stack.cli("migrate", "swap", "--target", "docs", "--lock-wait", "2")
        assert refused.returncode == 4 and "app-report-job" in refused.stderr
        done = stack.cli("migrate", "swap", "--target", "docs", "--terminate-idle-after", "1")
    assert done.returncode == 0, done.stderr
    assert "terminating pid" in done.stderr
    assert max(latencies) < 0.6, sorted(latencies)[-5:]
    # Gone (a terminated backend leaves pg_stat_activity as it exits, after it released
    # its locks: once in ~3 PG15 runs, the swap committed before that).
    wait_for(lambda: _sessions_named(stack, "app-report-job") == 0, timeout=10,
             message="the terminated session gone")
    reader.close()
    wait_filled(stack, "embedding")
    wait_filled(stack, column)
    assert_column_current(stack, "embedding", "fake-alt-384", 384)
    assert_column_current(stack, column, "fake-384", 384)
