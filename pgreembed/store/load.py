"""How busy the database is for the app: the latency of a probe query and the number
of other clients' active queries. The throttle backs off on either."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.store.trusted_sql import NO_PARAMS, trusted_sql

# Our own sessions are left out: the question is whether the app is waiting, and our
# writers are always active while a backfill runs.
_ACTIVE_OTHERS = sql.SQL(
    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
    " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
    " AND application_name NOT LIKE {}").format(sql.Literal("pgreembed%"))


@dataclass(frozen=True)
class LoadSample:
    probe_seconds: float
    active_others: int


def sample_load(conn: psycopg.Connection, probe_sql: str, timeout_ms: int, *,
                read_only: bool = False) -> LoadSample:
    """Time `probe_sql` (trusted config) and count other clients' active queries.

    `conn` is autocommit (no transaction is left open). A probe that exceeds
    `timeout_ms` is cancelled by the server and reported as taking that long. The timeout
    (and with `read_only`, READ ONLY) is the probe's transaction's own: set for the
    session, it would stay on the server session, which a pooler in transaction mode
    hands to the workers' writes next. (A plain `SET` inside probe_sql would too: use
    `SET LOCAL` there.)
    """
    try:
        with conn.transaction():
            if read_only:
                conn.execute("SET TRANSACTION READ ONLY")
            conn.execute("SELECT set_config('statement_timeout', %s, true)",
                         (f"{int(timeout_ms)}ms",))
            started = time.perf_counter()
            conn.execute(trusted_sql(probe_sql), NO_PARAMS)
            probe = time.perf_counter() - started
    except psycopg.errors.QueryCanceled:
        probe = timeout_ms / 1000
    row = conn.execute(_ACTIVE_OTHERS).fetchone()
    return LoadSample(probe, int(row[0]) if row else 0)
