"""Who holds the app's table while our DDL waits, and what we may do about it.

Read from pg_locks (visible to every role) joined with pg_stat_activity, whose state,
query and transaction start Postgres hides for other roles' sessions unless ours has
pg_read_all_stats: a hidden blocker is named by pid, role and application only. An
autovacuum is told apart without its query text (`track_activities = off` empties it,
and it is hidden anyway): it is in pg_stat_progress_vacuum (pids are visible) and
runs as no role. Whether it was started to prevent wraparound comes from the table's
age against autovacuum_freeze_max_age (and the multixact one), as autovacuum decides
it: such a run is never cancelled. Cancelling and terminating re-check the pid, the
table and the lock in the same statement, so a pid reused meanwhile is never hit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.store.privileges import (
    READ_ALL_STATS,
    SIGNAL_AUTOVACUUM,
    Privileges,
)

log = logging.getLogger(__name__)

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


def _freeze_limit(setting: str) -> str:
    # A table's own autovacuum_*freeze_max_age can only lower the server's.
    return (f"least(coalesce((SELECT option_value::bigint FROM pg_options_to_table"
            f"(c.reloptions) WHERE option_name = '{setting}'),"
            f" current_setting('{setting}')::bigint), current_setting('{setting}')::bigint)")


# Over pg_class `c`: an autovacuum of this table now runs to prevent wraparound.
WRAPAROUND = (f"(c.relkind = 'r' AND (age(c.relfrozenxid) >"
              f" {_freeze_limit('autovacuum_freeze_max_age')} OR mxid_age(c.relminmxid) >"
              f" {_freeze_limit('autovacuum_multixact_freeze_max_age')}))")
# Over pg_stat_activity `a` (left joined) and pg_stat_progress_vacuum `v`.
AUTOVACUUM = ("(a.backend_type = 'autovacuum worker'"
              " OR (v.pid IS NOT NULL AND a.usesysid IS NULL))")


@dataclass(frozen=True)
class Blocker:
    """A session holding a lock on the table (what the operator needs to identify it)."""

    pid: int
    application_name: str
    state: str
    transaction_seconds: float | None
    mode: str
    role: str | None = None
    hidden: bool = False  # state and transaction age hidden from our role
    autovacuum: bool = False
    wraparound: bool = False  # an autovacuum run to prevent wraparound: never cancelled
    # Whether our role may end it, as Postgres decides: a member of its role (a
    # superuser's session only by a superuser), or pg_signal_backend for a non-superuser's.
    endable: bool = False

    @property
    def idle_in_transaction(self) -> bool:
        return self.state.startswith("idle in transaction")

    @property
    def cancellable_autovacuum(self) -> bool:
        return self.autovacuum and not self.wraparound

    def __str__(self) -> str:
        age = ("" if self.transaction_seconds is None
               else f", transaction open {self.transaction_seconds:.1f} s")
        kind = ("autovacuum to prevent wraparound" if self.autovacuum and self.wraparound
                else "autovacuum" if self.autovacuum else "")
        app = self.application_name or kind or "?"
        role = f", role {self.role}" if self.role else ""
        state = ("state hidden" if self.hidden
                 else "running" if self.autovacuum and self.state == "?" else self.state)
        return f"pid {self.pid} ({app}, {state}{age}, holds {self.mode}{role})"


def blockers(conn: psycopg.Connection, table: sql.Composable) -> list[Blocker]:
    """Sessions (other than ours) holding a granted lock on `table`."""
    rows = conn.execute(sql.SQL(
        """
        SELECT l.pid, coalesce(a.application_name, ''), coalesce(a.state, '?'),
               extract(epoch FROM now() - a.xact_start)::float8,
               string_agg(DISTINCT l.mode, '+' ORDER BY l.mode), a.usename,
               a.state IS NULL AND NOT coalesce({autovacuum}, false), coalesce({autovacuum}, false),
               {wraparound} OR coalesce(a.query LIKE '%%to prevent wraparound%%', false),
               coalesce(CASE WHEN r.rolsuper THEN me.rolsuper
                        ELSE pg_has_role(r.oid, 'USAGE')
                             OR pg_has_role('pg_signal_backend', 'USAGE') END, false)
        FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
        LEFT JOIN pg_stat_activity a ON a.pid = l.pid
        LEFT JOIN pg_stat_progress_vacuum v ON v.pid = l.pid
        LEFT JOIN pg_roles r ON r.oid = a.usesysid
        JOIN pg_roles me ON me.rolname = current_user
        WHERE l.locktype = 'relation' AND l.relation = to_regclass(%s) AND l.granted
          AND l.pid <> pg_backend_pid()
        GROUP BY 1, 2, 3, 4, 6, 7, 8, 9, 10 ORDER BY 4 DESC NULLS LAST
        """).format(autovacuum=sql.SQL(AUTOVACUUM), wraparound=sql.SQL(WRAPAROUND)),
        (table.as_string(conn),)).fetchall()
    return [Blocker(int(r[0]), r[1], r[2], r[3], r[4], r[5], bool(r[6]), bool(r[7]),
                    bool(r[8]), bool(r[9])) for r in rows]


def row_holders(conn: psycopg.Connection, table: sql.Composable, where: sql.Composable,
                params: tuple[object, ...]) -> list[Blocker]:
    """Sessions holding a lock on the rows of `table` matching `where` (over alias `t`).

    A row lock has no pg_locks entry of its own: the row's xmax names the locking
    transaction, whose own transactionid lock its session holds (visible to every role).
    A row locked by several transactions at once (a multixact) names none."""
    rows = conn.execute(sql.SQL(
        """
        SELECT l.pid, coalesce(a.application_name, ''), coalesce(a.state, '?'),
               extract(epoch FROM now() - a.xact_start)::float8, a.usename, a.state IS NULL
        FROM {table} t
        JOIN pg_locks l ON l.locktype = 'transactionid' AND l.transactionid = t.xmax
             AND l.mode = 'ExclusiveLock' AND l.granted
        LEFT JOIN pg_stat_activity a ON a.pid = l.pid
        WHERE ({where}) AND l.pid <> pg_backend_pid()
        """).format(table=table, where=where), params).fetchall()
    return [Blocker(int(r[0]), r[1], r[2], r[3], "a lock on the row", r[4], bool(r[5]))
            for r in rows]


def idle_conflicting(found: list[Blocker], mode: str) -> list[Blocker]:
    """Sessions idle in a transaction (for a while) that hold a lock conflicting with `mode`.

    An attempt while one of them holds the table cannot succeed and would only stall the
    app's queries for lock_timeout: wait (or end them) instead of attempting.
    """
    conflicting = CONFLICTS[mode]
    return [b for b in found if b.state.startswith("idle in transaction")
            and (b.transaction_seconds or 0) > IDLE_SECONDS
            and conflicting & set(b.mode.split("+"))]


def cancel_autovacuum(conn: psycopg.Connection, table: sql.Composable, found: list[Blocker],
                      mode: str) -> bool:
    """Cancel the autovacuum workers whose lock on the table conflicts with `mode`; True
    if any was. Not one run to prevent wraparound; not while a session idle in a
    transaction holds a conflicting lock too (the attempt would fail anyway).

    Postgres cancels an autovacuum that blocks a lock request after deadlock_timeout (1 s)
    of waiting, but our attempts wait 100 ms, so it never would: on an HNSW-indexed table an
    autovacuum holds SHARE UPDATE EXCLUSIVE for minutes (measured: a rollback at 500k rows
    gave up after 62 s behind one). Doing what Postgres would do costs a later autovacuum.
    Needs superuser or pg_signal_autovacuum_worker (the caller checks).
    """
    if idle_conflicting([b for b in found if not b.autovacuum], mode):
        return False
    cancelled = False
    for blocker in found:
        if not blocker.cancellable_autovacuum:
            continue
        row = conn.execute(sql.SQL(
            """
            SELECT pg_cancel_backend(l.pid)
            FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
            LEFT JOIN pg_stat_progress_vacuum v ON v.pid = l.pid  -- empty: track_activities off
            LEFT JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.pid = %s AND l.locktype = 'relation' AND l.relation = to_regclass(%s)
              AND l.granted AND l.mode = ANY(%s) AND {autovacuum} AND NOT {wraparound}
              AND NOT coalesce(a.query LIKE '%%to prevent wraparound%%', false)
            """).format(autovacuum=sql.SQL(AUTOVACUUM), wraparound=sql.SQL(WRAPAROUND)),
            (blocker.pid, table.as_string(conn), sorted(CONFLICTS[mode]))).fetchone()
        if row is not None and row[0]:
            log.warning("cancelled %s, as Postgres does for a lock waiter", blocker)
            cancelled = True
    return cancelled


def outwait_autovacuum(conn: psycopg.Connection, table: sql.Composable,
                       found: list[Blocker], mode: str) -> bool:
    """Have Postgres cancel an autovacuum in the way when this role may not: request the
    autovacuum's own lock, SHARE UPDATE EXCLUSIVE, for a little longer than
    deadlock_timeout. Postgres cancels an autovacuum (not one run to prevent wraparound)
    that blocks any lock request that long, whoever asks; and no query of the app
    conflicts with that mode, so the waiting request queues none of them (an ACCESS
    EXCLUSIVE attempt that long would stall every app query behind it). Granted:
    committed at once, True (the next attempt follows at once; the autovacuum comes back
    only after its naptime). Not while a session idle in a transaction blocks us too.
    `conn` is in autocommit mode."""
    if idle_conflicting([b for b in found if not b.autovacuum], mode):
        return False
    if not any(b.cancellable_autovacuum and CONFLICTS[mode] & set(b.mode.split("+"))
               for b in found):
        return False
    row = conn.execute("SELECT setting::int FROM pg_settings WHERE name = 'deadlock_timeout'"
                       ).fetchone()
    wait_ms = (int(row[0]) if row else 1000) + OUTWAIT_MARGIN_MS
    try:
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
                sql.Literal(f"{wait_ms}ms")))
            conn.execute(sql.SQL("LOCK TABLE {} IN SHARE UPDATE EXCLUSIVE MODE").format(table))
    except psycopg.errors.LockNotAvailable:
        return False
    log.warning("the autovacuum of %s was cancelled by Postgres for our SHARE UPDATE"
                " EXCLUSIVE request (%d ms; the app's queries do not wait on that mode)",
                table.as_string(conn), wait_ms)
    return True


OUTWAIT_MARGIN_MS = 500  # past deadlock_timeout: Postgres' deadlock check runs at its end


def unendable_idle(found: list[Blocker]) -> list[Blocker]:
    """Sessions idle in a transaction that this role may not end (said, never attempted)."""
    return [b for b in found if b.idle_in_transaction and not b.endable]


def terminate_idle(conn: psycopg.Connection, found: list[Blocker], older_than: float) -> bool:
    """End the sessions idle in a transaction open `older_than` seconds that this role may
    end (the others are left alone: Degraded says so once); True if any was.
    Each is re-checked (pid, state, age) in the statement that ends it."""
    ended = False
    for blocker in found:
        if not (blocker.idle_in_transaction and blocker.endable
                and (blocker.transaction_seconds or 0) >= older_than):
            continue
        log.warning("terminating %s: idle in a transaction that holds the table", blocker)
        try:
            row = conn.execute(
                "SELECT pg_terminate_backend(pid, 1000) FROM pg_stat_activity WHERE pid = %s"
                " AND state LIKE 'idle in transaction%%'"
                " AND now() - xact_start >= make_interval(secs => %s)",
                (blocker.pid, older_than)).fetchone()
        except psycopg.errors.InsufficientPrivilege:  # its role changed since we looked
            log.warning("cannot end pid %d: this role may not signal it", blocker.pid)
            continue
        ended = ended or bool(row and row[0])
    return ended


class Degraded:
    """The lines that say, once per step, what this role cannot do about the blockers."""

    def __init__(self, step: str, privileges: Privileges) -> None:
        self.step = step
        self.privileges = privileges
        self.said: set[str] = set()
        self.hints: list[str] = []

    def _say(self, key: str, line: str) -> None:
        if key not in self.said:
            self.said.add(key)
            self.hints.append(line)
            log.warning("%s: %s", self.step, line)

    @property
    def grant_signal_backend(self) -> str:
        """The statement an admin runs so that --terminate-idle-after may end other roles'
        sessions (printed as advice, the role quoted)."""
        return sql.SQL("GRANT pg_signal_backend TO {};").format(
            sql.Identifier(self.privileges.role)).as_string()

    def notice(self, found: list[Blocker], terminate_idle_after: float | None) -> None:
        cannot_end = unendable_idle(found) if terminate_idle_after is not None else []
        if cannot_end:
            pids = ", ".join(f"pid {b.pid} (role {b.role or '?'})" for b in cannot_end)
            self._say("signal_backend", (
                f"--terminate-idle-after cannot end {pids}: a superuser's session may be"
                " ended only by a superuser; waiting for them"
                if self.privileges.signal_backend else
                f"--terminate-idle-after cannot end {pids}: this role may end only sessions"
                " of roles it is a member of (`" + self.grant_signal_backend + "` lets it"
                " end other roles' sessions); waiting for them"))
        if any(b.hidden for b in found):
            self._say("hidden", "the state of other roles' sessions is hidden from this role"
                      f" (grant {READ_ALL_STATS.roles}): idle transactions cannot be told"
                      " apart" + (", so --terminate-idle-after cannot end them"
                                  if terminate_idle_after is not None else ""))
        for b in found:
            if b.autovacuum and b.wraparound:
                self._say(f"wraparound {b.pid}", f"pid {b.pid} is an autovacuum to prevent"
                          " transaction ID wraparound, never cancelled: waiting for it")
            elif b.autovacuum and not self.privileges.signal_autovacuum:
                self._say(f"autovacuum {b.pid}", f"pid {b.pid}, an autovacuum, holds the"
                          f" table; this role may not cancel it (grant"
                          f" {SIGNAL_AUTOVACUUM.roles}): asking Postgres to, by a"
                          " SHARE UPDATE EXCLUSIVE request past deadlock_timeout")
