"""One build per index at a time: a second builder waits for the first, never drops it.

CREATE INDEX CONCURRENTLY makes its index visible at once and INVALID until the build
ends, so an INVALID index is either a dead build's leftover (drop it, build again) or a
build in progress (leave it alone). Two `migrate index` at once, or one beside `init`
or a tick taking a side fill to its index, used to drop each other's build (measured:
the second's DROP INDEX CONCURRENTLY waited for the first build, then the pair ended in
"deadlock detected"). Our builds hold a session advisory lock named after the index for
the whole build; a build by anyone else shows in pg_stat_progress_create_index. (Not
pg_locks: the app's own statements lock every index of the table, the INVALID ones too.)

Waiting is by polling pg_try_advisory_lock: a session blocked in pg_advisory_lock holds
a snapshot, and the build in progress waits for every older snapshot before it ends.
The wait has a deadline (an hour by default: an ANN build of a big table takes many
minutes, a pending index's far less); past it, one line names the session holding the
build, so a hung one never makes `migrate index` or `init` wait forever.

Without pg_read_all_stats a role sees only its own rows of pg_stat_progress_create_index:
another role's build of the same index is then invisible, so only our own builds (which
hold the advisory lock) are recognised as builds in progress.

The lock is a session's, so a build needs one database session throughout. Behind a
connection pooler in transaction mode each statement may run on another server session:
the lock would be taken on one and never released (a later build of the index then waits
for a lock nobody will give back, until the pooler closes that connection; seen behind
PgBouncer, tests/test_pooler.py). A build that sees one of its next statements run on
another session gives the lock back if it can and refuses, naming the pooler. The check
is best effort: a pooler that reuses one server session while it is quiet passes it, and
its later statements may still move; the lock is then given back at the end the same way,
or named in a warning.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import psycopg

from pgreembed.errors import ConfigError, WaitTimeoutError
from pgreembed.store import pooling

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
WAIT_SECONDS = 3600.0
# Statements tried to reach the session holding the lock again (behind a pooler that
# hands out its server connections in turn, one of the next few does).
RELEASE_ATTEMPTS = 8


def _key(schema: str, name: str) -> tuple[str]:
    return (f"pgreembed.index_build:{schema}.{name}",)


def other_build(conn: psycopg.Connection, schema: str, name: str) -> int | None:
    """The pid of another session building the index `schema.name` now, if any."""
    row = conn.execute(
        "SELECT pid FROM pg_stat_progress_create_index"
        " WHERE index_relid = to_regclass(format('%%I.%%I', %s::text, %s::text))"
        " AND pid <> pg_backend_pid() LIMIT 1", (schema, name)).fetchone()
    return None if row is None else int(row[0])


def lock_holder(conn: psycopg.Connection, schema: str, name: str) -> int | None:
    """The pid of the session holding the build's advisory lock, if another one does."""
    row = conn.execute(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
        " AND ((classid::bigint << 32) | objid::bigint) = hashtextextended(%s, 0)"
        " AND pid <> pg_backend_pid() LIMIT 1", _key(schema, name)).fetchone()
    return None if row is None else int(row[0])


def _describe(conn: psycopg.Connection, pid: int | None) -> str:
    if pid is None:
        return "another session"
    row = conn.execute("SELECT application_name FROM pg_stat_activity WHERE pid = %s",
                       (pid,)).fetchone()
    app = f", application_name {row[0]!r}" if row and row[0] else ""
    return f"session pid {pid}{app}"


@contextlib.contextmanager
def sole_builder(conn: psycopg.Connection, schema: str, name: str,
                 wait_seconds: float = WAIT_SECONDS) -> Iterator[None]:
    """Hold the build of `schema.name` for the block, after any build in progress ended
    (WaitTimeoutError if it has not within `wait_seconds`).

    `conn` must be in autocommit mode (each poll is its own short transaction) and is
    the connection that builds: the advisory lock is its session's.
    """
    deadline = time.monotonic() + wait_seconds
    waited_for: int | None = None
    while True:
        got = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0)),"
                           " pg_backend_pid()", _key(schema, name)).fetchone()
        if got and got[0]:
            locked_by = int(got[1])
            _require_one_session(conn, locked_by, schema, name)
            pid = other_build(conn, schema, name)
            if pid is None:
                break
            if not _release(conn, locked_by, schema, name):
                raise _pooled(schema, name, locked_by, None, released=False)
        else:
            pid = lock_holder(conn, schema, name)
        if time.monotonic() >= deadline:
            raise WaitTimeoutError(
                f"index {schema}.{name} is still being built by {_describe(conn, pid)} after"
                f" {wait_seconds:g} s: run again once that build ends (or, if it hangs,"
                f" end that session with pg_cancel_backend({pid or 'its pid'}))")
        if waited_for is None:
            log.info("index %s is being built by %s: waiting for that build", name,
                     _describe(conn, pid))
            waited_for = -1 if pid is None else pid
        time.sleep(POLL_SECONDS)
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.Error):  # a lost session released it already
            if not _release(conn, locked_by, schema, name):
                log.warning("index %s.%s: the build's lock is left on server session pid"
                            " %d: %s. Once that session is idle, SELECT"
                            " pg_terminate_backend(%d) ends it", schema, name, locked_by,
                            _POOLER_ADVICE, locked_by)


_POOLER_ADVICE = ("a connection pooler in transaction mode sits between pgreembed and"
                  " Postgres. Index builds (`pgreembed init`, `migrate start`, `migrate"
                  " index`, `migrate swap`, a side fill's step in `tick` or the scheduler)"
                  " need Postgres directly or the pooler's session mode: point their"
                  " DATABASE_URL there (the workers may stay behind the pooler)")


def _pooled(schema: str, name: str, locked_by: int, other: int | None, *, released: bool
            ) -> ConfigError:
    """The refusal of a build whose statements run on several sessions."""
    seen = f"pids {locked_by} and {other}" if other is not None else f"pid {locked_by} and others"
    left = ("" if released else
            f" The build's lock stays with server session pid {locked_by} until the pooler"
            f" closes that connection (a later build of this index waits for it); once it"
            f" is idle, SELECT pg_terminate_backend({locked_by}) ends it.")
    return ConfigError(
        f"index {schema}.{name}: a build needs one database session throughout, and its"
        f" statements ran on several ({seen}): {_POOLER_ADVICE}.{left}")


def _release(conn: psycopg.Connection, locked_by: int, schema: str, name: str) -> bool:
    """Give the build's lock back on the session that took it: the first statement does on
    a direct connection; behind a pooler, one of the next few may reach that session.
    False if none did."""
    for _ in range(RELEASE_ATTEMPTS):
        row = conn.execute("SELECT CASE WHEN pg_backend_pid() = %s THEN"
                           " pg_advisory_unlock(hashtextextended(%s, 0)) END",
                           (locked_by, *_key(schema, name))).fetchone()
        if row is not None and row[0] is not None:
            return True  # on its session: released (or no longer held there)
    return False


def _require_one_session(conn: psycopg.Connection, locked_by: int, schema: str,
                         name: str) -> None:
    """ConfigError, the lock given back if it can be, if one of the next statements runs on
    another session than the one that took the lock (a transaction-mode pooler)."""
    other = pooling.other_session(conn, locked_by)
    if other is not None:
        raise _pooled(schema, name, locked_by, other,
                      released=_release(conn, locked_by, schema, name))
