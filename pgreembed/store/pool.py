"""Connections to Postgres: one pool per process, created lazily after fork.

The pool checks a connection before lending it (so a Postgres restart costs
no failed batch), registers pgvector's types on every new connection, and
disables server-side prepared plans, which break after a column swap changes
a column's type ("cached plan must not change result type"). Every connection,
pooled or dedicated, pins our session settings (store.session: READ COMMITTED
whatever the database's default, our own idle-in-transaction limit).
"""

from __future__ import annotations

import contextlib
import threading

import psycopg
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

from pgreembed.errors import DatabaseError
from pgreembed.observability.redact import redact
from pgreembed.store.session import pin_session

_pools: dict[str, ConnectionPool] = {}
_lock = threading.Lock()


def _configure(conn: psycopg.Connection) -> None:
    conn.prepare_threshold = None
    pin_session(conn)
    register_vector(conn)


def connect(dsn: str, *, autocommit: bool = False, vector: bool = True) -> psycopg.Connection:
    """A dedicated connection (leader lock, LISTEN, DDL); errors never show the password."""
    try:
        conn = psycopg.connect(dsn, autocommit=autocommit, prepare_threshold=None,
                               application_name="pgreembed")
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot connect to Postgres: {redact(str(exc))}") from None
    try:
        pin_session(conn)
    except psycopg.Error as exc:
        conn.close()
        raise DatabaseError(f"cannot set up the session: {redact(str(exc))}") from None
    if vector:
        # Without the extension yet, `init` reports that clearly; nothing to register.
        with contextlib.suppress(psycopg.ProgrammingError):
            register_vector(conn)
    return conn


def get_pool(dsn: str, max_size: int = 4) -> ConnectionPool:
    """The process-wide pool for `dsn` (create it in the worker process, never before fork)."""
    with _lock:
        pool = _pools.get(dsn)
        if pool is None:
            pool = ConnectionPool(
                dsn,
                min_size=1,
                max_size=max_size,
                open=True,
                configure=_configure,
                check=ConnectionPool.check_connection,
                kwargs={"application_name": "pgreembed-worker"},
                name="pgreembed",
                reconnect_timeout=300,
            )
            _pools[dsn] = pool
        return pool


def close_pools() -> None:
    """Close every pool of this process (tests and graceful shutdown)."""
    with _lock:
        for pool in _pools.values():
            pool.close()
        _pools.clear()
