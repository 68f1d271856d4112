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
from pgreembed.store.blockers import (
    ACCESS_EXCLUSIVE,
    Blocker,
    Degraded,
    blockers,
    cancel_autovacuum,
    idle_conflicting,
    outwait_autovacuum,
    terminate_idle,
    unendable_idle,
)
from pgreembed.store.pool import PREPARE, connect
from pgreembed.store.privileges import privileges

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_LOCK_TIMEOUT_MS = 100
DEFAULT_WAIT_SECONDS = 60.0


class RowBusy(TableBusyError):
    """`work` timed out on a row it locks before the table (a migration's row, held by a
    pause or a spend reservation while it runs): run_locked retries it like a busy table,
    but names that row and its holders, not the table's (which are not in the way)."""

    def __init__(self, what: str, holders: list[Blocker], hint: str) -> None:
        self.what, self.holders, self.hint = what, holders, hint
        super().__init__(f"{what} is locked by {_named(holders)}: {hint}")


def _named(holders: list[Blocker]) -> str:
    return "; ".join(map(str, holders)) or "a transaction this role cannot see"


@dataclass(frozen=True)
class LockPolicy:
    """How hard to try for the table's lock: per attempt, overall, and whom to end."""

    lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
    wait_seconds: float = DEFAULT_WAIT_SECONDS
    terminate_idle_after: float | None = None


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
                 _writers_key(table, conn), prepare=PREPARE)


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


def _what_to_do(policy: LockPolicy, found: list[Blocker]) -> str:
    """The advice that fits: --terminate-idle-after only when it was not given, and not
    'try it' when it was given and this role may not end the idle sessions."""
    if policy.terminate_idle_after is None:
        return "Try again, or end those sessions (--terminate-idle-after ends idle ones)"
    if unendable_idle(found):
        return "Try again once those sessions end (this role may not end them)"
    return "Try again, or end those sessions"


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
    degraded: Degraded | None = None
    while True:
        with connect(dsn) as conn:
            if degraded is None:  # what this role may do about blockers, asked once
                degraded = Degraded(step, privileges(conn))
            # The first attempt is always made: work that needs no lock (an init with
            # nothing to change) must not wait for idle sessions it does not conflict with.
            stuck = (idle_conflicting(blockers(conn, table), mode)
                     if mode and attempts else [])
            conn.commit()
            row_busy: RowBusy | None = None
            if not stuck:
                attempts += 1
                try:
                    hold_writers_out(conn, table, policy.lock_timeout_ms)
                    result = work(conn)
                    conn.commit()
                    return result
                except psycopg.errors.LockNotAvailable:
                    conn.rollback()
                except RowBusy as busy:
                    conn.rollback()
                    row_busy = busy
            found = row_busy.holders if row_busy is not None else blockers(conn, table)
            conn.commit()
        degraded.notice(found, policy.terminate_idle_after)
        waited = time.monotonic() - started
        if on_busy is not None:
            on_busy(attempts, found)
        busy_what = row_busy.what if row_busy is not None else "table"
        if time.monotonic() - logged_at >= 5.0:
            logged_at = time.monotonic()
            log.warning("%s: %s busy (%d attempts, %.1f s, lock_timeout %d ms%s); held by"
                        " %s", step, busy_what, attempts, waited, policy.lock_timeout_ms,
                        ", waiting for idle transactions" if stuck else "",
                        "; ".join(map(str, found)) or "sessions that just finished")
        if waited >= policy.wait_seconds and row_busy is not None:
            raise TableBusyError(
                f"could not {step}: {row_busy.what} stayed locked for {waited:.0f} s"
                f" ({attempts} attempts of {policy.lock_timeout_ms} ms); nothing changed."
                f" Held by: {_named(found)}. {row_busy.hint}")
        if waited >= policy.wait_seconds:
            raise TableBusyError(
                f"could not {step}: the table stayed busy for {waited:.0f} s"
                f" ({attempts} attempts of {policy.lock_timeout_ms} ms); nothing changed."
                f" Held by: {'; '.join(map(str, found)) or 'nobody now'}. "
                + _what_to_do(policy, found)
                + "".join(f". {hint[0].upper()}{hint[1:]}" for hint in degraded.hints))
        if row_busy is None:  # the table's blockers: ours to cancel or end, if allowed
            with connect(dsn, autocommit=True, vector=False) as admin:
                if degraded.privileges.signal_autovacuum and cancel_autovacuum(
                        admin, table, found, mode or ACCESS_EXCLUSIVE):
                    continue
                if not degraded.privileges.signal_autovacuum and outwait_autovacuum(
                        admin, table, found, mode or ACCESS_EXCLUSIVE):
                    continue
                if (policy.terminate_idle_after is not None
                        and waited >= policy.terminate_idle_after
                        and terminate_idle(admin, found, policy.terminate_idle_after)):
                    continue  # at once, before the app reconnects and reads again
        # Jittered pause: the app's queued queries run, and retrying processes don't align.
        time.sleep(0.25 if stuck else random.uniform(0.05, min(1.0, 0.1 * attempts)))
