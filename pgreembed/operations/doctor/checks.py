"""`pgreembed doctor`: read-only health checks of each configured target.

Finds what silently degrades search or wastes money: a vector column of the
wrong type or size, vectors of mixed dimensions or from several models, zero
or non-normalised vectors under cosine distance, rows with no text, a missing
or INVALID index (a failed `CREATE INDEX CONCURRENTLY` is still maintained on
every write but never used), an index whose operator class does not match the
distance the app queries with, a worker fleet that needs more Postgres
connections than the server allows, and the throttle (its cap, the pace in force, an
adaptive probe that is slow right now). Every statement of ours is a SELECT, the
operator's probe_sql runs in a READ ONLY transaction, and the session has a statement
and a lock timeout, so it is safe to run against production at any time. (Not a
read-only session default: through a transaction-mode pooler it would stay on a pooled
server session and fail the workers' writes there.) `--verify N` also re-embeds a sample of
rows and compares (see `pgreembed.operations.verify`); that costs tokens, so it is opt-in.
`--recall` measures each ANN index's recall against exact search (see
`pgreembed.operations.recall_check`); that costs one sequential scan per sample query, so it
is opt-in too.

Every SQL statement it advises is composed with psycopg.sql and rendered with
the connection's quoting, so it is safe to paste whatever the names are.

"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import psycopg
from psycopg import sql

from pgreembed.config import Settings, Target
from pgreembed.observability.redact import redact
from pgreembed.operations.doctor.app_objects import AppObjectChecks
from pgreembed.operations.doctor.base import (
    SCHEDULER_CONNECTIONS,
    Extension,
)
from pgreembed.operations.doctor.chunks import ChunkChecks
from pgreembed.operations.doctor.columns import ColumnChecks
from pgreembed.operations.doctor.findings import ERROR, OK, WARN, Finding
from pgreembed.operations.doctor.indexes import IndexChecks
from pgreembed.operations.doctor.privileges import PrivilegeChecks
from pgreembed.operations.doctor.samples import SampleChecks
from pgreembed.operations.doctor.throttle import ThrottleChecks
from pgreembed.operations.doctor.versions import VersionChecks
from pgreembed.operations.verify import DEFAULT_TOLERANCE
from pgreembed.store import pooling, server_versions
from pgreembed.store.pool import connect
from pgreembed.store.slots import (
    app_table,
    load_slots,
    registry_exists,
)


class _Doctor(AppObjectChecks, ChunkChecks, ColumnChecks, IndexChecks, SampleChecks,
              ThrottleChecks, PrivilegeChecks, VersionChecks):
    """All the checks, run on one read-only connection."""

    def extension(self) -> Extension | None:
        found = server_versions.read(self.conn)
        if found.pgvector is not None and found.pgvector_schema is not None:
            ext = Extension(found.pgvector, found.pgvector_schema)
            self.add(OK, None, "pgvector", f"pgvector {ext.version} installed"
                     f" (schema {ext.schema})")
            # Load the library so its settings (hnsw.ef_search, ...) become visible.
            self.conn.execute(sql.SQL("SELECT '[1]'::{}").format(
                sql.Identifier(ext.schema, "vector")))
            return ext
        available = found.pgvector_available
        if available is None:
            self.add(ERROR, None, "pgvector", "pgvector is not available on this Postgres"
                     " server: install the extension package, then run `pgreembed init`")
        else:
            self.add(ERROR, None, "pgvector", f"pgvector {available} is available but not"
                     " installed in this database: run `pgreembed init`")
        return None

    def connections(self) -> None:
        max_conn = int(self.one("SELECT current_setting('max_connections')")[0])
        reserved = int(self.one("SELECT current_setting('superuser_reserved_connections')")[0])
        extra = self.one("SELECT current_setting('reserved_connections', true)")[0]
        reserved += int(extra or 0)
        others = int(self.one(
            # backend_type is hidden (NULL) for other roles' sessions without
            # pg_read_all_stats; those are clients when they run as a role.
            "SELECT count(*) FROM pg_stat_activity WHERE coalesce(backend_type,"
            " CASE WHEN usesysid IS NOT NULL THEN 'client backend' END) = 'client backend'"
            " AND pid <> pg_backend_pid()"
            " AND coalesce(application_name, '') NOT LIKE 'pgreembed%'")[0])
        pool = self.settings.pool_max_size
        needed = self.worker_processes * pool + SCHEDULER_CONNECTIONS
        usable = max_conn - reserved
        detail = (f"{self.worker_processes} worker processes x pool_max_size {pool}"
                  f" + {SCHEDULER_CONNECTIONS} for the scheduler = {needed} connections;"
                  f" max_connections {max_conn} ({reserved} reserved), {others} in use by"
                  " other clients")
        if needed > usable:
            self.add(ERROR, None, "connections", f"{detail}: more than the server allows;"
                     " lower worker.pool_max_size or the worker count, or add a pooler"
                     " (PgBouncer, transaction mode)")
        elif needed > usable - others:
            self.add(WARN, None, "connections", f"{detail}: does not fit next to the current"
                     " clients; workers will fail to connect under load")
        else:
            self.add(OK, None, "connections", detail)

    def target(self, target: Target, ext: Extension | None) -> None:
        name = target.name
        self.guarded(name, "role", lambda: self.role_rights(target))
        self.guarded(name, "misconfigured", lambda: self._misconfigured(target))
        qualified = f"{target.schema}.{target.table}"
        table = app_table(target)
        oid_row = self.conn.execute("SELECT to_regclass(%s)::oid",
                                    (table.as_string(self.conn),)).fetchone()
        if oid_row is None or oid_row[0] is None:
            self.add(ERROR, name, "table", f"table {qualified} does not exist")
            return
        oid = int(oid_row[0])
        missing_text = [c for c in target.text_columns if self._column(oid, c) is None]
        if missing_text:
            self.add(ERROR, name, "text_columns", f"{qualified}: text column(s)"
                     f" {', '.join(missing_text)} do not exist")
        else:
            self.add(OK, name, "table", f"{qualified} and its text column(s)"
                     f" {', '.join(target.text_columns)} exist")
            self.guarded(name, "missing_text", lambda: self._missing_text(target, table))

        column = self._column(oid, target.vector_column)
        where = f"{qualified}.{target.vector_column}"
        if column is None:
            self.add(ERROR, name, "vector_column", f"{where} does not exist: run"
                     " `pgreembed init`")
            return
        if not self._column_type(target, column, where) or ext is None:
            return
        vector = sql.Identifier(target.vector_column)
        self.guarded(name, "null_vectors", lambda: self._nulls(target, table, vector, where))
        if column.typmod < 0:
            self.guarded(name, "dimensions",
                         lambda: self._mixed_dims(target, table, vector, ext, column, where))
        self.guarded(name, "models", lambda: self._models(target, where))
        self.guarded(name, "norms",
                     lambda: self._norms(target, oid, table, vector, ext, column, where))
        self.guarded(name, "indexes", lambda: self._indexes(target, oid, where, ext))
        self.guarded(name, "app_objects", lambda: self.app_objects(target))
        if target.parent is not None:
            self.guarded(name, "chunk_backlog", lambda: self.chunk_backlog(target))
            self.guarded(name, "chunk_orphans", lambda: self.chunk_orphans(target))

    def _misconfigured(self, target: Target) -> None:
        """A column whose every request the provider refuses as configured: an error."""
        if not registry_exists(self.conn):
            return  # `models` says to run init
        for slot in load_slots(self.conn, target):
            if slot.frozen:  # adopted from pgai
                self.add(WARN, target.name, "misconfigured",
                         f"{target.schema}.{target.table}.{slot.vector_column}"
                         f" ({slot.model_key}, {slot.role}) is frozen: {slot.misconfigured}",
                         {"column": slot.vector_column, "model": slot.model_key,
                          "reason": slot.misconfigured})
            elif slot.misconfigured:
                self.add(ERROR, target.name, "misconfigured",
                         f"{target.schema}.{target.table}.{slot.vector_column}"
                         f" ({slot.model_key}, {slot.role}) is misconfigured, nothing is"
                         f" sent for it: {redact(slot.misconfigured)}; fix the config (model,"
                         " dimensions, base URL), then run `pgreembed init`",
                         {"column": slot.vector_column, "model": slot.model_key,
                          "reason": redact(slot.misconfigured)})


POOLER_FOUND = (
    "a connection pooler in transaction mode sits between pgreembed and Postgres (two"
    " statements in a row ran on server sessions {} and {}): doctor ran without its"
    " statement and lock timeouts, which would have stayed on a pooled session for whoever"
    " gets it next. The workers may use this"
    " URL; the scheduler, a cron `tick`, `init` and the `migrate` steps need Postgres"
    " directly or a session-mode pooler (docs/operations.md, \"Connection poolers\")")


@contextlib.contextmanager
def _guarded_session(conn: psycopg.Connection, statement_timeout: float
                     ) -> Iterator[tuple[int, int] | None]:
    """A statement and a lock timeout for the block, taken back after (a pooler that
    reused one session for us hands it to others next). Behind a pooler seen moving our
    statements between sessions, neither is set: yields the pids seen."""
    seen = pooling.moving_sessions(conn)
    if seen is not None:
        yield seen
        return
    try:
        conn.execute(sql.SQL("SET statement_timeout = {}").format(
            sql.Literal(f"{int(statement_timeout * 1000)}ms")))
        conn.execute("SET lock_timeout = '5s'")
        yield None
    finally:
        with contextlib.suppress(psycopg.Error):
            conn.execute("RESET statement_timeout")
            conn.execute("RESET lock_timeout")


def run_doctor(settings: Settings, *, targets: list[str] | None = None, sample_rows: int = 1000,
               worker_processes: int = 2, statement_timeout: float = 60.0,
               verify_rows: int = 0, tolerance: float = DEFAULT_TOLERANCE,
               announce: Callable[[str], None] = print, recall_queries: int = 0,
               recall_k: int = 10, recall_target: float | None = None) -> list[Finding]:
    """Check every configured target (or `targets`) without writing anything.

    `verify_rows` > 0 re-embeds that many sampled rows per vector column (tokens are
    spent; `announce` is told how many before each request). `recall_queries` > 0
    measures each ANN index's recall@`recall_k` on that many sample queries (no tokens;
    one sequential scan per query for the exact answer)."""
    chosen = [settings.target(name) for name in targets] if targets else list(
        settings.targets.values())
    with connect(settings.database_url, autocommit=True, vector=False) as conn, \
            _guarded_session(conn, statement_timeout) as pooled:
        doctor = _Doctor(conn, settings, sample_rows, worker_processes)
        if pooled is not None:
            doctor.add(WARN, None, "pooler", POOLER_FOUND.format(*pooled),
                       {"server_pids": list(pooled)})
        ext = None
        try:
            ext = doctor.extension()
        except psycopg.Error as exc:
            doctor.add(ERROR, None, "pgvector", f"cannot inspect extensions: {redact(str(exc))}")
        doctor.guarded(None, "versions", doctor.versions)
        doctor.guarded(None, "connections", doctor.connections)
        doctor.guarded(None, "throttle", doctor.throttle)
        doctor.guarded(None, "privileges", doctor.optional_grants)
        for target in chosen:
            doctor.guarded(target.name, "target", functools.partial(doctor.target, target, ext))
            if verify_rows > 0:
                doctor.guarded(target.name, "verify", functools.partial(
                    doctor.verify, target, verify_rows, tolerance, announce))
            if recall_queries > 0:
                doctor.guarded(target.name, "recall", functools.partial(
                    doctor.recall, target, recall_queries, recall_k, recall_target))
        return doctor.findings
