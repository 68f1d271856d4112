"""Whether a connection's statements run on one server session.

Behind a connection pooler in transaction mode (PgBouncer, Supavisor, RDS Proxy) each
statement of an autocommit connection may run on another server session: a session
lock or a `SET` lands on one session and stays there, for whichever client the pooler
hands that session to next (docs/operations.md, "Connection poolers"). Seeing the backend
pid change is proof; seeing it stay is not (a quiet pooler may reuse one session), so
callers treat this as a best-effort check.
"""

from __future__ import annotations

import psycopg

from pgreembed.errors import ConfigError

PROBES = 3  # statements looked at (on a direct connection all run on one session)


def backend_pid(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def other_session(conn: psycopg.Connection, pid: int, probes: int = PROBES) -> int | None:
    """The pid of another server session than `pid` that one of the next `probes`
    statements ran on, if one did."""
    for _ in range(probes):
        seen = backend_pid(conn)
        if seen != pid:
            return seen
    return None


def moving_sessions(conn: psycopg.Connection) -> tuple[int, int] | None:
    """(a pid, another) if `conn`'s next statements are seen on two server sessions."""
    first = backend_pid(conn)
    other = other_session(conn, first)
    return None if other is None else (first, other)


def require_one_session(conn: psycopg.Connection, what: str) -> None:
    """ConfigError if `conn`'s statements are seen moving between server sessions."""
    seen = moving_sessions(conn)
    if seen is not None:
        first, other = seen
        raise ConfigError(
            f"{what} needs a database session of its own, and two statements in a row ran"
            f" on server sessions {first} and {other}: a connection pooler in transaction"
            " mode sits between pgreembed and Postgres. Point its DATABASE_URL at Postgres"
            " directly or at the pooler's session mode (the workers may stay behind the"
            " pooler; docs/operations.md, \"Connection poolers\")")
