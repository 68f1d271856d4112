"""Background writes never wait on the app's row locks (invariant 10).

The app's transactions touch two rows in descending key order (row b, a pause, row a;
some DELETE row b, which fires our trigger that deletes its state rows)
at the moment a batch writing both lands. A write that locks rows in its join order waits
on b while holding a, and the app then waits on a: a deadlock, which holds the app's
transaction for deadlock_timeout (1 s) and aborts one side. Our write must lock only rows
nobody holds (SKIP LOCKED), leave the others pending, and keep their paid vectors for the
next pass, which writes them without a second provider call.

The app runs with lock_timeout = HELD_MS: the server cancels a statement that waits on a
lock longer, so "held" is the server's own measure of waiting on a lock, not the test
process's clock (which a loaded machine stalls: CI once saw three app transactions of one
round "held" ~230 ms each).
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    Stack,
    assert_column_current,
    docs_config,
    seed,
    wait_filled,
    wait_for,
    write_config,
)

MODEL, DIMS = "fake-384", 384
ROUNDS, PAIRS = 8, 4  # app transactions: ROUNDS x PAIRS, PAIRS at a time
PAUSE = 0.3  # the app's own pause between its two updates
HELD_MS = 200  # an app statement that waits on a lock this long was held by us
FIRST = {"UPDATE": "UPDATE docs SET views = views + 1 WHERE id = %s",
         "DELETE": "DELETE FROM docs WHERE id = %s"}


def _deadlocks(stack: Stack) -> int:
    with stack.connect() as conn:
        row = conn.execute("SELECT deadlocks FROM pg_stat_database"
                           " WHERE datname = current_database()").fetchone()
    return int(row[0]) if row else 0


def _app_transaction(dsn: str, a: int, b: int, first: str, barrier: threading.Barrier,
                     aborted: list[str]) -> None:
    """`first` (UPDATE or DELETE) row b, wait for the batch to be let go, pause, UPDATE
    row a, COMMIT; a statement held on a lock for HELD_MS is cancelled (lock_timeout) and
    the transaction counts as aborted. A DELETE fires our trigger that deletes the row's
    state rows."""
    with psycopg.connect(dsn, options=f"-c lock_timeout={HELD_MS}") as conn:
        try:
            conn.execute(FIRST[first], (b,))
            barrier.wait(30)
            time.sleep(PAUSE)  # the scenario: the app's pause inside its transaction
            conn.execute("UPDATE docs SET views = views + 1 WHERE id = %s", (a,))
            conn.commit()
        except psycopg.Error as exc:
            aborted.append(f"rows {a},{b}: {type(exc).__name__}: {exc}")
            conn.rollback()


@pytest.mark.second_server
def test_a_batch_write_never_holds_or_deadlocks_an_app_transaction(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    write_config(stack.config_path, docs_config(batch_size=2 * PAIRS))
    seed(stack, 2 * ROUNDS * PAIRS)
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    bought_before = fake_openai.stats()["inputs_embedded"]
    deadlocks_before = _deadlocks(stack)

    aborted: list[str] = []
    for round_no in range(ROUNDS):
        marker = f"held-{round_no}"
        first = round_no * 2 * PAIRS + 1
        keys = range(first, first + 2 * PAIRS)
        # The round's rows are edited; their batch waits at the provider until let go.
        fake_openai.set_faults(hold_marker=marker)
        requests = fake_openai.stats()["requests"]
        with stack.connect() as conn:
            conn.execute("UPDATE docs SET body = body || %s WHERE id = ANY(%s)",
                         (f" {marker}", list(keys)))
        wait_for(lambda r=requests: fake_openai.stats()["requests"] > r, timeout=30,  # type: ignore[misc]
                 message="the round's batch at the provider")
        barrier = threading.Barrier(PAIRS + 1)
        apps = [threading.Thread(target=_app_transaction,
                                 args=(stack.dsn, a, a + 1, "DELETE" if a == first else "UPDATE",
                                       barrier, aborted))
                for a in keys[::2]]
        for app in apps:
            app.start()
        barrier.wait(30)  # every app holds its row b: the batch lands now
        fake_openai.set_faults(hold_marker=None)
        for app in apps:
            app.join(30)

    wait_filled(stack, "embedding")
    assert_column_current(stack, "embedding", MODEL, DIMS)
    assert aborted == [], f"{len(aborted)} of {ROUNDS * PAIRS} app transactions: {aborted}"
    assert _deadlocks(stack) == deadlocks_before
    assert "deadlock detected" not in stack.log_text()
    with stack.connect() as conn:  # the deleted rows' state went with them
        orphans = conn.execute("SELECT count(*) FROM pgreembed.slot_1 s WHERE NOT EXISTS"
                               " (SELECT FROM docs d WHERE d.id = s.pgr_pk)").fetchone()
    assert orphans == (0,)
    # Rows skipped because the app held them were written from their kept vectors: each
    # edited row's text was bought once.
    stats = fake_openai.stats()
    assert stats["inputs_embedded"] - bought_before == ROUNDS * 2 * PAIRS
    assert max(stats["text_counts"].values()) == 1
    with stack.connect() as conn:  # and counted once in the ledger, when bought
        ledger = conn.execute("SELECT sum(inputs), sum(tokens) FROM pgreembed.usage"
                              ).fetchone()
    assert ledger == (stats["inputs_embedded"], stats["tokens_embedded"])


    # An app session that locks a pending row and sits idle: the row is tried again at the
    # scheduler's poll (0.5 s in the tests' config), not in a loop, and written once free.
    fake_openai.set_faults(hold_marker="idle")
    requests = fake_openai.stats()["requests"]
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'idle' WHERE id = 1")
    wait_for(lambda: fake_openai.stats()["requests"] > requests, timeout=30,
             message="the row's batch at the provider")
    tries_before = stack.log_text().count("1 held by another transaction")
    with psycopg.connect(stack.dsn) as app:
        app.execute("UPDATE docs SET views = views + 1 WHERE id = 1")
        fake_openai.set_faults(hold_marker=None)
        time.sleep(3.0)  # the scenario: the app holds the row for 3 s
    wait_filled(stack, "embedding")
    assert_column_current(stack, "embedding", MODEL, DIMS)
    tries = stack.log_text().count("1 held by another transaction") - tries_before
    assert 1 <= tries <= 12, f"{tries} writes tried the held row in 3 s"
