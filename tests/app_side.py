"""The app's side of a real deployment, for tests that run as users' databases are: a
database default of REPEATABLE READ, a view and a BEGIN ATOMIC function on the vector
column owned by the app's owner role, and multi-row app transactions that hold rows."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from tests.helpers import OrdinaryRoles, Stack, in_background

APP_SLEEP = 0.3  # the app's transaction works this long between its two rows
HELD = 0.2  # an app transaction that waited on locks this long in all was held by someone


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
    (each on its own share of the keys: they never wait on each other, only on us).

    `held`: the transactions that waited on locks more than HELD in all, their seconds
    of waiting as the server saw them (kept current while they run); `slow`: those that
    took longer than their own work by HELD from the app's side (the wall clock: a
    machine-wide stall of the disk or the CPU delays every transaction alike, so it is
    reported, not asserted; see `_watch_lock_waits`)."""

    held: list[float] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    done: int = 0
    slow: list[float] = dataclasses.field(default_factory=list)
    blockers: set[str] = dataclasses.field(default_factory=set)
    samples: int = 0  # of the lock-wait watcher: none taken is an error


LOCK_WAITS = """
SELECT w.pid, w.xact_start, w.query_start,
       extract(epoch FROM clock_timestamp() - w.query_start)::float8,
       ARRAY(SELECT coalesce(nullif(b.application_name, ''), b.usename::text, '?')
             FROM pg_stat_activity b WHERE b.pid = ANY(pg_blocking_pids(w.pid)))
FROM pg_stat_activity w WHERE w.pid = ANY(%s) AND w.wait_event_type = 'Lock'
"""


def _watch_lock_waits(dsn: str, pids: list[int], seen: AppTransactions,
                      lock: threading.Lock, stop: threading.Event) -> None:
    """Sample, every 20 ms, the app sessions waiting on a lock; a statement's wait is as
    long as the statement (a one-row UPDATE that does nothing else), a transaction's the
    sum of its statements'. The server's view, not the app's clock: a COMMIT that waited
    0.3 s on a stalled disk, or a thread the CPU left behind, is no wait on a lock (two CI
    runs failed so, every transaction of the moment alike). A wait is a lower bound when
    this thread itself is stalled."""
    waits: dict[tuple[int, object], dict[object, float]] = {}
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            while not stop.wait(0.02):
                found = conn.execute(LOCK_WAITS, (pids,)).fetchall()
                with lock:
                    seen.samples += 1
                    for pid, xact, statement, seconds, blockers in found:
                        mine = waits.setdefault((pid, xact), {})
                        mine[statement] = max(seconds, mine.get(statement, 0.0))
                        if sum(mine.values()) > HELD:
                            seen.blockers.update(blockers)
                    seen.held = [round(sum(w.values()), 3) for w in waits.values()
                                 if sum(w.values()) > HELD]
    except psycopg.Error as exc:
        with lock:
            seen.errors.append(f"the lock-wait watcher failed: {exc}")
    with lock:
        if not seen.samples:
            seen.errors.append("the lock-wait watcher took no sample")


@contextmanager
def app_transactions(dsn: str, keys: range) -> Iterator[AppTransactions]:
    shares = [[k for k in keys if k % 4 == share] for share in range(4)]
    # Each of the 4 sessions holds two rows of its own share: with fewer, a thread would
    # die at its first transaction and the scenario run without it.
    assert all(len(mine) >= 2 for mine in shares), f"app_transactions needs >= 8 keys: {keys}"
    seen = AppTransactions()
    lock = threading.Lock()

    def run(conn: psycopg.Connection, share: int, stop: threading.Event) -> None:
        rng = random.Random(share)
        mine = shares[share]
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
                    seen.slow.append(round(extra, 3))

    with contextlib.ExitStack() as sessions:
        conns = [sessions.enter_context(psycopg.connect(dsn)) for _ in shares]
        pids = [conn.info.backend_pid for conn in conns]
        with in_background(functools.partial(_watch_lock_waits, dsn, pids, seen, lock),
                           *[functools.partial(run, conn, share)
                             for share, conn in enumerate(conns)]):
            yield seen
