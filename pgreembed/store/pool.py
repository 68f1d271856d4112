"""Connections to Postgres: one pool per process, created lazily after fork.

The pool checks a connection before lending it (so a Postgres restart costs
no failed batch) and registers pgvector's types on every new connection. Every
connection, pooled or dedicated, pins our session settings (store.session: READ
COMMITTED whatever the database's default, our own idle-in-transaction limit); pooled
ones also keep their backend's freed memory between statements (`[worker]
kept_memory_mb`, store.session.keep_freed_memory).

Server-side prepared statements: never psycopg's automatic ones (after 5 runs), which
break after a column swap changes a column's type ("cached plan must not change result
type") in a query that returns the vector. With `[worker] prepared_statements` on, the
pool prepares only the statements that ask for it (`prepare=PREPARE`): the write path's,
none of which returns a vector (opt-in: ~1.7% of the server's instructions per row
written, bench.callgrind_write; docs/operations.md says when it is safe). Postgres
re-analyzes a prepared statement after DDL on what it reads (a swap's renames), so it
follows the columns as an unprepared one does. Dedicated connections never prepare.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import psycopg
from pgvector.psycopg import register_vector
from psycopg_pool import ConnectionPool

from pgreembed.config import KEPT_MEMORY_MB
from pgreembed.errors import DatabaseError
from pgreembed.observability.redact import redact
from pgreembed.store.session import keep_freed_memory, pin_session

if TYPE_CHECKING:
    from pgreembed.config import Settings

_pools: dict[str, ConnectionPool] = {}
_lock = threading.Lock()

# What a statement of the write path passes as `execute(..., prepare=PREPARE)`: prepared
# on a connection whose prepare_threshold is a number (a pooled one with prepared
# statements on), sent unprepared where it is None (the setting off, dedicated ones).
PREPARE = True
# Never reached: psycopg prepares no statement by itself, only those asking (PREPARE).
_ONLY_ON_REQUEST = 2**62


def _configure(prepared: bool, kept_memory_mb: int) -> Callable[[psycopg.Connection], None]:
    def configure(conn: psycopg.Connection) -> None:
        conn.prepare_threshold = _ONLY_ON_REQUEST if prepared else None
        pin_session(conn)
        keep_freed_memory(conn, kept_memory_mb)  # small write slices through HNSW
        register_vector(conn)

    return configure


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


def get_pool(dsn: str, max_size: int = 4, *, prepared_statements: bool = False,
             kept_memory_mb: int = KEPT_MEMORY_MB) -> ConnectionPool:
    """The process-wide pool for `dsn` (create it in the worker process, never before fork).
    `prepared_statements`, `kept_memory_mb`: those `[worker]` settings (see the module's
    docstring); the first call of the process decides, as for `max_size`."""
    with _lock:
        pool = _pools.get(dsn)
        if pool is None:
            pool = ConnectionPool(
                dsn,
                min_size=1,
                max_size=max_size,
                open=True,
                configure=_configure(prepared_statements, kept_memory_mb),
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


def worker_pool(settings: Settings) -> ConnectionPool:
    """The process-wide pool as the settings size and configure it (`[worker]`
    pool_max_size, prepared_statements and kept_memory_mb)."""
    return get_pool(settings.database_url, settings.pool_max_size,
                    prepared_statements=settings.prepared_statements,
                    kept_memory_mb=settings.kept_memory_mb)
