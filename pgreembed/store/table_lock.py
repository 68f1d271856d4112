"""DDL on the application's table without stalling the application.

Every schema change of the app's table (ADD/DROP COLUMN, triggers, the swap's
renames) needs a lock that conflicts with the app's own queries. Waiting for it
is what hurts: a lock request waiting in the queue blocks every query that
arrives after it, for as long as it waits (a 2 s lock_timeout behind one idle
transaction stalled every client 2 s per retry). So each attempt waits at most
`lock_timeout` (100 ms by default), then gives the table back for a jittered
pause, and the attempts go on until `wait` seconds have passed. While it
retries it names the sessions holding the table, so the operator knows whom to
wait for; `terminate_idle_after` optionally ends sessions that sit idle in a
transaction on the table for longer than that (like pg_repack's --wait-timeout).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import psycopg
from psycopg import sql

from pgreembed.errors import TableBusyError
from pgreembed.store.pool import connect

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_LOCK_TIMEOUT_MS = 100
DEFAULT_WAIT_SECONDS = 60.0


@dataclass(frozen=True)
class Blocker:
    """A session holding a lock on the table (what the operator needs to identify it)."""

    pid: int
    application_name: str
    state: str
    transaction_seconds: float | None
    mode: str
    # An autovacuum that Postgres itself would cancel for a lock waiter (not one run to
    # prevent transaction ID wraparound, which it never cancels).
    cancellable_autovacuum: bool = False

    def __str__(self) -> str:
        age = ("" if self.transaction_seconds is None
               else f", transaction open {self.transaction_seconds:.1f} s")
        app = self.application_name or ("autovacuum" if self.cancellable_autovacuum else "?")
        return f"pid {self.pid} ({app}, {self.state}{age}, holds {self.mode})"


@dataclass(frozen=True)
class LockPolicy:
    """How hard to try for the table's lock: per attempt, overall, and whom to end."""

    lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
    wait_seconds: float = DEFAULT_WAIT_SECONDS
    terminate_idle_after: float | None = None


def blockers(conn: psycopg.Connection, table: sql.Composable) -> list[Blocker]:
    """Sessions (other than ours) holding a granted lock on `table`."""
    rows = conn.execute(
        """
        SELECT a.pid, a.application_name, coalesce(a.state, '?'),
               extract(epoch FROM now() - a.xact_start)::float8,
               string_agg(DISTINCT l.mode, '+' ORDER BY l.mode),
               a.backend_type = 'autovacuum worker'
                   AND a.query NOT LIKE '%%to prevent wraparound%%'
        FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE l.locktype = 'relation' AND l.relation = to_regclass(%s) AND l.granted
          AND l.pid <> pg_backend_pid()
        GROUP BY 1, 2, 3, 4, 6 ORDER BY 4 DESC NULLS LAST
        """, (table.as_string(conn),)).fetchall()
    return [Blocker(int(r[0]), r[1] or "", r[2], r[3], r[4], bool(r[5])) for r in rows]


def _cancel_autovacuum(conn: psycopg.Connection, found: list[Blocker]) -> bool:
    """Cancel autovacuum workers holding the table; True if any.

    Postgres cancels an autovacuum that blocks a lock request after deadlock_timeout (1 s)
    of waiting, but our attempts wait 100 ms, so it never would: on an HNSW-indexed table an
    autovacuum holds SHARE UPDATE EXCLUSIVE for minutes (measured: a rollback at 500k rows
    gave up after 62 s behind one). Doing what Postgres would do costs nothing but a later
    autovacuum; wraparound-prevention runs are never touched.
    """
    cancelled = False
    for blocker in found:
        if blocker.cancellable_autovacuum:
            log.warning("cancelling %s, as Postgres does for a lock waiter", blocker)
            conn.execute("SELECT pg_cancel_backend(%s)", (blocker.pid,))
            cancelled = True
    return cancelled


def _terminate_idle(conn: psycopg.Connection, found: list[Blocker], older_than: float) -> bool:
    """End the sessions idle in a transaction open `older_than` seconds; True if any."""
    ended = False
    for blocker in found:
        idle = blocker.state.startswith("idle in transaction")
        if idle and (blocker.transaction_seconds or 0) >= older_than:
            log.warning("terminating %s: idle in a transaction that holds the table",
                        blocker)
            conn.execute("SELECT pg_terminate_backend(%s, 1000)", (blocker.pid,))
            ended = True
    return ended


ACCESS_EXCLUSIVE = "AccessExclusiveLock"  # DROP/ADD/RENAME COLUMN, LOCK TABLE
SHARE_ROW_EXCLUSIVE = "ShareRowExclusiveLock"  # CREATE/DROP TRIGGER

# Which held lock modes a request of each mode waits for (PostgreSQL's conflict table).
CONFLICTS = {
    ACCESS_EXCLUSIVE: {"AccessShareLock", "RowShareLock", "RowExclusiveLock",
                            "ShareUpdateExclusiveLock", "ShareLock", "ShareRowExclusiveLock",
                            "ExclusiveLock", "AccessExclusiveLock"},
    SHARE_ROW_EXCLUSIVE: {"RowExclusiveLock", "ShareUpdateExclusiveLock", "ShareLock",
                              "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock"},
}
IDLE_SECONDS = 1.0  # an idle transaction older than this is not about to commit


def idle_conflicting(found: list[Blocker], mode: str) -> list[Blocker]:
    """Sessions idle in a transaction (for a while) that hold a lock conflicting with `mode`.

    An attempt while one of them holds the table cannot succeed and would only stall the
    app's queries for lock_timeout: wait (or end them) instead of attempting.
    """
    conflicting = CONFLICTS[mode]
    return [b for b in found if b.state.startswith("idle in transaction")
            and (b.transaction_seconds or 0) > IDLE_SECONDS
            and conflicting & set(b.mode.split("+"))]


# Our own writers (workers, the Batch API collector) hold this advisory lock, shared, for
# their whole write transaction; DDL takes it exclusively first. On an HNSW-indexed table a
# worker's write holds ROW EXCLUSIVE for seconds (measured at 500k rows: 2-5 s per batch),
# so with several workers some write is always in flight and a 100 ms attempt at ACCESS
# EXCLUSIVE never succeeds (a swap gave up after 60 s). Holding the writers out first
# (they wait on the advisory lock, which no query of the app touches) leaves only the
# app's short statements to wait for.
WRITERS_WAIT_MS = 30_000  # how long DDL waits for our writers' transactions in flight


def _writers_key(table: sql.Composable, conn: psycopg.Connection) -> tuple[str]:
    return (f"pgreembed.writers:{table.as_string(conn)}",)


def join_writers(conn: psycopg.Connection, table: sql.Composable) -> None:
    """In a writer's transaction, before it locks the table: DDL may hold writers out."""
    conn.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 0))",
                 _writers_key(table, conn))


def hold_writers_out(conn: psycopg.Connection, table: sql.Composable,
                     lock_timeout_ms: int) -> None:
    """Wait (at most WRITERS_WAIT_MS) until our writers in flight commit and keep new ones
    waiting until this transaction ends; then lock waits are short again."""
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
        sql.Literal(f"{WRITERS_WAIT_MS}ms")))
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                 _writers_key(table, conn))
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
        sql.Literal(f"{lock_timeout_ms}ms")))


def run_locked(dsn: str, table: sql.Composable, step: str,
               work: Callable[[psycopg.Connection], T], policy: LockPolicy | None = None,
               *, mode: str | None = None,
               on_busy: Callable[[int, list[Blocker]], None] | None = None) -> T:
    """Run `work(conn)` in one transaction whose lock waits are short; retry while busy.

    Our own writers are held out first (see WRITERS_WAIT_MS), so an attempt waits only for
    the app's statements. `mode` is the strongest lock `work` takes on `table`: while a
    session idle in a
    transaction holds a conflicting one, no attempt is made (it would fail after stalling
    the app). `work` must be safe to run again (it is rolled back on each busy attempt).
    Raises TableBusyError naming the blockers when `policy.wait_seconds` ran out.
    """
    policy = policy or LockPolicy()
    started = time.monotonic()
    attempts = 0
    logged_at = -1e9
    while True:
        with connect(dsn) as conn:
            # The first attempt is always made: work that needs no lock (an init with
            # nothing to change) must not wait for idle sessions it does not conflict with.
            stuck = (idle_conflicting(blockers(conn, table), mode)
                     if mode and attempts else [])
            conn.commit()
            if not stuck:
                attempts += 1
                try:
                    hold_writers_out(conn, table, policy.lock_timeout_ms)
                    result = work(conn)
                    conn.commit()
                    return result
                except psycopg.errors.LockNotAvailable:
                    conn.rollback()
            found = blockers(conn, table)
            conn.commit()
        waited = time.monotonic() - started
        if on_busy is not None:
            on_busy(attempts, found)
        if time.monotonic() - logged_at >= 5.0:
            logged_at = time.monotonic()
            log.warning("%s: table busy (%d attempts, %.1f s, lock_timeout %d ms%s); held by"
                        " %s", step, attempts, waited, policy.lock_timeout_ms,
                        ", waiting for idle transactions" if stuck else "",
                        "; ".join(map(str, found)) or "sessions that just finished")
        if waited >= policy.wait_seconds:
            raise TableBusyError(
                f"could not {step}: the table stayed busy for {waited:.0f} s"
                f" ({attempts} attempts of {policy.lock_timeout_ms} ms); nothing changed."
                f" Held by: {'; '.join(map(str, found)) or 'nobody now'}. Try again,"
                " or end those sessions (--terminate-idle-after ends idle ones)")
        with connect(dsn, autocommit=True, vector=False) as admin:
            if _cancel_autovacuum(admin, found):
                continue
            if (policy.terminate_idle_after is not None
                    and waited >= policy.terminate_idle_after
                    and _terminate_idle(admin, found, policy.terminate_idle_after)):
                continue  # at once, before the app reconnects and reads again
        # Jittered pause: the app's queued queries run, and retrying processes don't align.
        time.sleep(0.25 if stuck else random.uniform(0.05, min(1.0, 0.1 * attempts)))
