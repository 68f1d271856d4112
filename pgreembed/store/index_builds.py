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
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import psycopg

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5


def _key(schema: str, name: str) -> tuple[str]:
    return (f"pgreembed.index_build:{schema}.{name}",)


def other_build(conn: psycopg.Connection, schema: str, name: str) -> int | None:
    """The pid of another session building the index `schema.name` now, if any."""
    row = conn.execute(
        "SELECT pid FROM pg_stat_progress_create_index"
        " WHERE index_relid = to_regclass(format('%%I.%%I', %s::text, %s::text))"
        " AND pid <> pg_backend_pid() LIMIT 1", (schema, name)).fetchone()
    return None if row is None else int(row[0])


@contextlib.contextmanager
def sole_builder(conn: psycopg.Connection, schema: str, name: str) -> Iterator[None]:
    """Hold the build of `schema.name` for the block, after any build in progress ended.

    `conn` must be in autocommit mode (each poll is its own short transaction) and is
    the connection that builds: the advisory lock is its session's.
    """
    waited_for: int | None = None
    while True:
        got = conn.execute("SELECT pg_try_advisory_lock(hashtextextended(%s, 0))",
                           _key(schema, name)).fetchone()
        if got and got[0]:
            pid = other_build(conn, schema, name)
            if pid is None:
                break
            conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))",
                         _key(schema, name))
        else:
            pid = -1
        if waited_for is None:
            log.info("index %s is being built by another session%s: waiting for that build",
                     name, "" if pid < 0 else f" (pid {pid})")
            waited_for = pid
        time.sleep(POLL_SECONDS)
    try:
        yield
    finally:
        with contextlib.suppress(psycopg.Error):  # a lost session released it already
            conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))",
                         _key(schema, name))
