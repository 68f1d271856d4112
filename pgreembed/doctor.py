"""`pgreembed doctor`: read-only health checks of each configured target.

Finds what silently degrades search or wastes money: a vector column of the
wrong type or size, vectors of mixed dimensions or from several models, zero
or non-normalised vectors under cosine distance, rows with no text, a missing
or INVALID index (a failed `CREATE INDEX CONCURRENTLY` is still maintained on
every write but never used), an index whose operator class does not match the
distance the app queries with, and a worker fleet that needs more Postgres
connections than the server allows. The session is read-only
(`default_transaction_read_only`) with a statement timeout, so it is safe to
run against production at any time. `--verify N` also re-embeds a sample of
rows and compares (see `pgreembed.verify`); that costs tokens, so it is opt-in.
`--recall` measures each ANN index's recall against exact search (see
`pgreembed.recall_check`); that costs one sequential scan per sample query, so it
is opt-in too.

Every SQL statement it advises is composed with psycopg.sql and rendered with
the connection's quoting, so it is safe to paste whatever the names are.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config import DISTANCES, Settings, Target, opclass_distance
from pgreembed.db import connect
from pgreembed.redact import redact
from pgreembed.slots import (
    Slot,
    load_slots,
    registry_exists,
    text_expression,
    vector_type_for,
)
from pgreembed.verify import DEFAULT_TOLERANCE, ColumnVerification, verify_slots

OK, WARN, ERROR = "ok", "warn", "error"
LEVELS = (OK, WARN, ERROR)
# Connections the scheduler holds: the leader lock, the dispatch pass, LISTEN.
SCHEDULER_CONNECTIONS = 3
ANN_METHODS = ("hnsw", "ivfflat")


@dataclass(frozen=True)
class Finding:
    """One result: `level` is ok, warn or error; `target` is None for server-wide checks.

    `details` carries what a program needs beyond the message (the SQL advised,
    the rows a verification disagrees on); omitted from JSON when there is none."""

    level: str
    target: str | None
    check: str
    message: str
    details: Mapping[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"level": self.level, "target": self.target,
                                 "check": self.check, "message": self.message}
        if self.details is not None:
            found["details"] = dict(self.details)
        return found


@dataclass(frozen=True)
class _Extension:
    version: str
    schema: str

    @property
    def at_least_0_8(self) -> bool:
        try:
            major, minor = (int(p) for p in self.version.split(".")[:2])
        except ValueError:
            return False
        return (major, minor) >= (0, 8)


@dataclass(frozen=True)
class _Column:
    attnum: int
    type_name: str
    typmod: int

    @property
    def declared(self) -> str:
        return self.type_name if self.typmod < 0 else f"{self.type_name}({self.typmod})"


class _Doctor:
    """Runs the checks on one read-only connection and collects findings."""

    def __init__(self, conn: psycopg.Connection, settings: Settings, sample_rows: int,
                 worker_processes: int) -> None:
        self.conn = conn
        self.settings = settings
        self.sample_rows = sample_rows
        self.worker_processes = worker_processes
        self.findings: list[Finding] = []

    def add(self, level: str, target: str | None, check: str, message: str,
            details: Mapping[str, Any] | None = None) -> None:
        self.findings.append(Finding(level, target, check, message, details))

    def statement(self, query: sql.Composable) -> str:
        """SQL to print as advice, quoted by this connection: safe to paste as is."""
        return query.as_string(self.conn)

    def guarded(self, target: str | None, check: str, run: Callable[[], None]) -> None:
        """Run one check; a failure or timeout becomes a finding, the others still run."""
        try:
            run()
        except psycopg.errors.QueryCanceled:
            self.add(WARN, target, check, f"check {check} skipped: it took longer than the"
                     " statement timeout (--statement-timeout)")
        except psycopg.errors.LockNotAvailable:
            self.add(WARN, target, check, f"check {check} skipped: a lock is held by DDL"
                     " (a migration or index build?)")
        except psycopg.Error as exc:
            self.add(ERROR, target, check, f"check {check} could not run:"
                     f" {type(exc).__name__}: {redact(str(exc))}")

    def one(self, query: str | sql.SQL | sql.Composed, params: Any = None) -> tuple[Any, ...]:
        row = self.conn.execute(query, params).fetchone()
        assert row is not None
        return tuple(row)

    # -- server-wide -------------------------------------------------------------

    def extension(self) -> _Extension | None:
        row = self.conn.execute(
            "SELECT e.extversion, n.nspname FROM pg_extension e"
            " JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'"
        ).fetchone()
        if row is not None:
            ext = _Extension(row[0], row[1])
            self.add(OK, None, "pgvector", f"pgvector {ext.version} installed"
                     f" (schema {ext.schema})")
            # Load the library so its settings (hnsw.ef_search, ...) become visible.
            self.conn.execute(sql.SQL("SELECT '[1]'::{}").format(
                sql.Identifier(ext.schema, "vector")))
            return ext
        available = self.conn.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
        if available is None:
            self.add(ERROR, None, "pgvector", "pgvector is not available on this Postgres"
                     " server: install the extension package, then run `pgreembed init`")
        else:
            self.add(ERROR, None, "pgvector", f"pgvector {available[0]} is available but not"
                     " installed in this database: run `pgreembed init`")
        return None

    def connections(self) -> None:
        max_conn = int(self.one("SELECT current_setting('max_connections')")[0])
        reserved = int(self.one("SELECT current_setting('superuser_reserved_connections')")[0])
        extra = self.one("SELECT current_setting('reserved_connections', true)")[0]
        reserved += int(extra or 0)
        others = int(self.one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
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

    # -- per target --------------------------------------------------------------

    def target(self, target: Target, ext: _Extension | None) -> None:
        name = target.name
        self.guarded(name, "misconfigured", lambda: self._misconfigured(target))
        qualified = f"{target.schema}.{target.table}"
        table = sql.Identifier(target.schema, target.table)
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
        self.guarded(name, "indexes", lambda: self._indexes(target, oid, column, where, ext))

    def _misconfigured(self, target: Target) -> None:
        """A column whose every request the provider refuses as configured: an error."""
        if not registry_exists(self.conn):
            return  # `models` says to run init
        for slot in load_slots(self.conn, target):
            if slot.misconfigured:
                self.add(ERROR, target.name, "misconfigured",
                         f"{target.schema}.{target.table}.{slot.vector_column}"
                         f" ({slot.model_key}, {slot.role}) is misconfigured, nothing is"
                         f" sent for it: {redact(slot.misconfigured)}; fix the config (model,"
                         " dimensions, base URL), then run `pgreembed init`",
                         {"column": slot.vector_column, "model": slot.model_key,
                          "reason": redact(slot.misconfigured)})

    def _column(self, oid: int, name: str) -> _Column | None:
        row = self.conn.execute(
            "SELECT a.attnum, t.typname, a.atttypmod FROM pg_attribute a"
            " JOIN pg_type t ON t.oid = a.atttypid"
            " WHERE a.attrelid = %s AND a.attname = %s AND a.attnum > 0"
            " AND NOT a.attisdropped", (oid, name)).fetchone()
        return None if row is None else _Column(int(row[0]), str(row[1]), int(row[2]))

    def _column_type(self, target: Target, column: _Column, where: str) -> bool:
        """Report the column's type; True when it is a pgvector type worth checking further."""
        wanted_type = vector_type_for(target.dimensions)
        wanted = f"{wanted_type}({target.dimensions})"
        if column.type_name not in ("vector", "halfvec"):
            self.add(ERROR, target.name, "vector_column", f"{where} is {column.declared},"
                     f" not a pgvector column; expected {wanted}")
            return False
        if column.typmod < 0:
            self.add(ERROR, target.name, "vector_column", f"{where} is {column.declared}"
                     f" without dimensions; expected {wanted} (an untyped column accepts"
                     " vectors of any size and cannot have an HNSW/IVFFlat index)")
        elif column.typmod != target.dimensions or column.type_name != wanted_type:
            self.add(ERROR, target.name, "vector_column", f"{where} is {column.declared} but"
                     f" {target.model_key} needs {wanted} (a model change is a migration)")
        else:
            self.add(OK, target.name, "vector_column", f"{where} is {wanted} as configured")
        return True

    def _nulls(self, target: Target, table: sql.Identifier, vector: sql.Identifier,
               where: str) -> None:
        # Counted through the partial index `WHERE vector IS NULL` that init creates.
        nulls = int(self.one(sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(
            table, vector))[0])
        if nulls:
            self.add(WARN, target.name, "null_vectors", f"{where}: {nulls} rows have no vector"
                     " (pending or failed; search does not find them): see `pgreembed status`"
                     " and `pgreembed failures`")
        else:
            self.add(OK, target.name, "null_vectors", f"{where}: every row has a vector")

    def _mixed_dims(self, target: Target, table: sql.Identifier, vector: sql.Identifier,
                    ext: _Extension, column: _Column, where: str) -> None:
        dims = sql.Identifier(ext.schema, "vector_dims")
        rows = self.conn.execute(sql.SQL(
            "SELECT {dims}({v}), count(*) FROM {t} WHERE {v} IS NOT NULL"
            " GROUP BY 1 ORDER BY 2 DESC").format(dims=dims, v=vector, t=table)).fetchall()
        counts = ", ".join(f"{d} dims: {n} rows" for d, n in rows)
        if len(rows) > 1:
            self.add(ERROR, target.name, "dimensions", f"{where} holds vectors of mixed"
                     f" dimensions ({counts}); distances between them are errors")
        elif rows and rows[0][0] != target.dimensions:
            self.add(ERROR, target.name, "dimensions", f"{where} holds {counts}, but"
                     f" {target.model_key} has {target.dimensions}")
        elif rows:
            self.add(OK, target.name, "dimensions", f"{where}: all vectors have"
                     f" {target.dimensions} dims")

    def _models(self, target: Target, where: str) -> None:
        if not registry_exists(self.conn):
            self.add(WARN, target.name, "models", "pgreembed bookkeeping not found:"
                     " run `pgreembed init`")
            return
        live = [s for s in load_slots(self.conn, target) if s.role == "live"]
        if not live:
            self.add(WARN, target.name, "models", f"target {target.name} is not initialised:"
                     " run `pgreembed init`")
            return
        slot = live[0]
        live_where = f"{target.schema}.{target.table}.{slot.vector_column}"
        if slot.vector_column != target.vector_column or slot.model_key != target.model_key:
            self.add(WARN, target.name, "models", f"the live column is {live_where}"
                     f" ({slot.model_key}) but the config says {where} ({target.model_key}):"
                     " run `pgreembed init` (or finish the migration)")
        if self.conn.execute("SELECT to_regclass(%s)", (slot.state_table.as_string(self.conn),)
                             ).fetchone() in (None, (None,)):
            self.add(WARN, target.name, "models", f"state table of {live_where} is missing:"
                     " run `pgreembed init`")
            return
        rows = self.conn.execute(sql.SQL(
            """
            SELECT coalesce(m.key, '(no record)'), count(*)
            FROM {table} a LEFT JOIN {state} s ON s.pgr_pk = a.{pk}
                 LEFT JOIN pgreembed.models m ON m.id = s.pgr_model_id
            WHERE a.{vector} IS NOT NULL
            GROUP BY 1 ORDER BY 2 DESC
            """).format(table=slot.table, state=slot.state_table, pk=slot.pk,
                        vector=slot.vector)).fetchall()
        counts = ", ".join(f"{key}: {n}" for key, n in rows)
        if len(rows) > 1:
            self.add(WARN, target.name, "models", f"{live_where} holds vectors from several"
                     f" models ({counts}); vectors of different models are not comparable, so"
                     " search is wrong for the outdated rows until they are re-embedded")
        elif rows and rows[0][0] != slot.model_key:
            self.add(WARN, target.name, "models", f"{live_where}: the state table records"
                     f" {counts}, not the live model {slot.model_key}")
        elif rows:
            self.add(OK, target.name, "models", f"{live_where}: all {rows[0][1]} vectors come"
                     f" from {slot.model_key}")

    def _norms(self, target: Target, oid: int, table: sql.Identifier, vector: sql.Identifier,
               ext: _Extension, column: _Column, where: str) -> None:
        norm_fn = "vector_norm" if column.type_name == "vector" else "l2_norm"
        tolerance = 1e-3 if column.type_name == "vector" else 1e-2
        estimate = float(self.one("SELECT reltuples FROM pg_class WHERE oid = %s", (oid,))[0])
        samples: list[sql.Composable] = [sql.SQL("")]
        if estimate > 20 * self.sample_rows:
            # Block sampling reads only a few pages of a big table.
            percent = min(100.0, 100.0 * 5 * self.sample_rows / estimate)
            samples.insert(0, sql.SQL("TABLESAMPLE SYSTEM ({})").format(sql.Literal(percent)))
        row: tuple[Any, ...] = (0, 0, 0, None, None)
        for sample in samples:
            row = self.one(sql.SQL(
                """
                SELECT count(*), count(*) FILTER (WHERE n = 0),
                       count(*) FILTER (WHERE n > 0 AND abs(n - 1) > %s),
                       min(n) FILTER (WHERE n > 0), max(n)
                FROM (SELECT {fn}({v}) AS n FROM {t} {sample} WHERE {v} IS NOT NULL
                      LIMIT %s) s
                """).format(fn=sql.Identifier(ext.schema, norm_fn), v=vector, t=table,
                            sample=sample), (tolerance, self.sample_rows))
            if row[0]:
                break
        sampled, zeros, off, low, high = row
        if not sampled:
            return
        cosine = target.distance == "cosine"
        if zeros:
            level = ERROR if cosine else WARN
            why = ("cosine distance to a zero vector is NaN, so these rows sort unpredictably"
                   if cosine else "a zero vector carries no meaning")
            self.add(level, target.name, "zero_vectors", f"{where}: {zeros} of {sampled}"
                     f" sampled vectors are all zeros ({why}); clear them to re-embed")
        if cosine and off:
            self.add(WARN, target.name, "normalised", f"{where}: {off} of {sampled} sampled"
                     f" vectors are not unit length (norms {low:.4g}..{high:.4g}); embedding"
                     " models return unit vectors, so these likely came from elsewhere, and"
                     " only unit vectors allow the cheaper inner-product index")
        if not zeros and not (cosine and off) and low is not None:
            self.add(OK, target.name, "norms", f"{where}: {sampled} sampled vectors, norms"
                     f" {low:.4g}..{high:.4g}")

    def _missing_text(self, target: Target, table: sql.Identifier) -> None:
        count = int(self.one(sql.SQL(
            "SELECT count(*) FROM {} WHERE coalesce(({})::text, '') ~ '^\\s*$'").format(
            table, text_expression(target)))[0])
        qualified = f"{target.schema}.{target.table}"
        if count:
            self.add(WARN, target.name, "missing_text", f"{qualified}: {count} rows have NULL"
                     " or empty text; they are recorded as failures and never get a vector")
        else:
            self.add(OK, target.name, "missing_text", f"{qualified}: every row has text")

    def _indexes(self, target: Target, oid: int, column: _Column, where: str,
                 ext: _Extension) -> None:
        rows = self.conn.execute(
            """
            SELECT c.relname, am.amname, i.indisvalid AND i.indisready,
                   ARRAY(SELECT o.opcname FROM unnest(i.indclass::oid[]) k
                         JOIN pg_opclass o ON o.oid = k),
                   EXISTS (SELECT 1 FROM pg_depend d
                           WHERE d.classid = 'pg_class'::regclass AND d.objid = i.indexrelid
                             AND d.refclassid = 'pg_class'::regclass
                             AND d.refobjid = i.indrelid AND d.refobjsubid = %s),
                   EXISTS (SELECT 1 FROM pg_stat_progress_create_index p
                           WHERE p.relid = i.indrelid
                             AND p.index_relid IN (0, i.indexrelid))
            FROM pg_index i
            JOIN pg_class c ON c.oid = i.indexrelid
            JOIN pg_am am ON am.oid = c.relam
            WHERE i.indrelid = %s
            ORDER BY c.relname
            """, (column.attnum, oid)).fetchall()
        qualified = f"{target.schema}.{target.table}"
        for name, _method, valid, _opclasses, _on_vector, building in rows:
            if valid:
                continue
            drop = self.statement(sql.SQL("DROP INDEX CONCURRENTLY {};").format(
                sql.Identifier(target.schema, name)))
            if building:
                self.add(WARN, target.name, "index_invalid", f"index {name} on {qualified} is"
                         " being built (CREATE INDEX CONCURRENTLY in progress)")
            elif name.startswith("pgreembed_pending_"):
                self.add(ERROR, target.name, "index_invalid", f"index {name} on {qualified} is"
                         " INVALID (a failed concurrent build): run `pgreembed init`, which"
                         " drops and rebuilds it")
            else:
                self.add(ERROR, target.name, "index_invalid", f"index {name} on {qualified} is"
                         " INVALID (left by a failed CREATE INDEX CONCURRENTLY): it is updated"
                         f" on every write but never used; `{drop}` and build it again",
                         {"sql": [drop]})
        ann = [r for r in rows if r[1] in ANN_METHODS and r[4]]
        valid_ann = [r for r in ann if r[2]]
        distance = target.distance
        operator = DISTANCES[distance]
        wanted_ops = f"{vector_type_for(target.dimensions)}_{distance}_ops"
        if not valid_ann:
            create = self._create_index(target, "hnsw", wanted_ops, ext)
            self.add(WARN, target.name, "index", f"{where} has no valid HNSW or IVFFlat index:"
                     f" every similarity search scans the whole table; e.g. `{create}`",
                     {"sql": [create]})
            return
        served = any(opclass_distance(str(o)) == distance
                     for r in valid_ann for o in r[3])
        for name, method, _valid, opclasses, _on_vector, _building in valid_ann:
            ops = ", ".join(opclasses)
            if any(opclass_distance(str(o)) == distance for o in opclasses):
                self.add(OK, target.name, "index_opclass", f"{where}: index {name} ({method}"
                         f" {ops}) matches the {distance} distance ({operator})")
            elif served:
                self.add(WARN, target.name, "index_opclass", f"{where}: index {name} uses"
                         f" {ops}, not the target's {distance} distance (another index serves"
                         f" {operator}): it slows every write; drop it unless something"
                         " queries with its operator")
            else:
                create = self._create_index(target, str(method), wanted_ops, ext)
                self.add(WARN, target.name, "index_opclass", f"{where}: index {name} uses"
                         f" {ops}, but the target's distance is {distance}: queries ordering"
                         f" by {operator} cannot use it; build one with {wanted_ops}:"
                         f" `{create}`", {"sql": [create]})
        self._hints(target, ext, {r[1] for r in valid_ann})

    def _create_index(self, target: Target, method: str, opclass: str, ext: _Extension
                      ) -> str:
        """The advised ANN index (the opclass qualified by pgvector's schema)."""
        return self.statement(sql.SQL(
            "CREATE INDEX CONCURRENTLY ON {table} USING {method} ({column} {opclass});"
        ).format(table=sql.Identifier(target.schema, target.table),
                 method=sql.Identifier(method), column=sql.Identifier(target.vector_column),
                 opclass=sql.Identifier(ext.schema, opclass)))

    def verify(self, target: Target, rows: int, tolerance: float,
               announce: Callable[[str], None]) -> None:
        """Re-embed a sample of every column being kept filled and compare (error if off)."""
        if not registry_exists(self.conn):
            self.add(WARN, target.name, "verify", "pgreembed bookkeeping not found: nothing"
                     " to verify (run `pgreembed init`)")
            return
        slots = load_slots(self.conn, target)
        if not slots:
            self.add(WARN, target.name, "verify", f"target {target.name} is not initialised:"
                     " nothing to verify")
            return
        for result in verify_slots(self.conn, self.settings, slots, rows, tolerance, announce):
            self._verified(target, result)

    def _verified(self, target: Target, result: ColumnVerification) -> None:
        where = f"{target.schema}.{target.table}.{result.column} ({result.role}, {result.model})"
        details = result.as_dict()
        if result.error is not None:
            self.add(ERROR, target.name, "verify", f"{where}: could not re-embed the sample:"
                     f" {result.error}", details)
            return
        if result.disagreements:
            shown = ", ".join(f"{d.key} ({d.cosine:.4f})" for d in result.disagreements[:20])
            more = len(result.disagreements) - 20
            self.add(ERROR, target.name, "verify", f"{where}: {len(result.disagreements)} of"
                     f" {result.sampled} sampled rows hold a vector that is not their text's"
                     f" under this model (cosine similarity below {result.tolerance}): rows"
                     f" {shown}{f' and {more} more' if more > 0 else ''}; clear their vectors"
                     f" to have them re-embedded ({result.tokens_billed:,} tokens billed)",
                     details)
        else:
            self.add(OK, target.name, "verify", f"{where}: all {result.sampled} sampled rows"
                     f" match a fresh embedding (cosine similarity >= {result.tolerance};"
                     f" {result.tokens_billed:,} tokens billed)", details)
        if result.not_embeddable:
            self.add(WARN, target.name, "verify", f"{where}: {len(result.not_embeddable)}"
                     " sampled rows could not be embedded again: " + "; ".join(
                         f"row {key}: {reason}" for key, reason in result.not_embeddable[:5]),
                     details)

    def recall(self, target: Target, queries: int, k: int, recall_target: float | None
               ) -> None:
        """Measure each column's index at the settings search applies (see recall_check)."""
        if not registry_exists(self.conn):
            self.add(WARN, target.name, "recall", "pgreembed bookkeeping not found: run"
                     " `pgreembed init`")
            return
        for slot in load_slots(self.conn, target):
            self.guarded(target.name, "recall", functools.partial(
                self._recall_of, target, slot, queries, k, recall_target))

    def _recall_of(self, target: Target, slot: Slot, queries: int, k: int,
                   recall_target: float | None) -> None:
        from pgreembed.recall_check import measure_slot

        result = measure_slot(self.conn, slot, queries, k, recall_target)
        where = f"{target.schema}.{target.table}.{slot.vector_column} ({slot.role})"
        if result is None:
            return  # no ANN index: the `index` check already says so
        settings = ", ".join(f"{n} = {v}" for n, v in result.settings.items()) or (
            "the server's settings (nothing recorded by `pgreembed tune`)")
        message = (f"{where}: index {result.index.name} ({result.index.method}) has recall@{k}"
                   f" {result.measurement.recall:.3f} at {settings} over"
                   f" {result.measurement.queries} sample queries, p50"
                   f" {result.measurement.p50_ms:.2f} ms, p99 {result.measurement.p99_ms:.2f} ms")
        if result.measurement.recall < result.target_recall:
            self.add(WARN, target.name, "recall", f"{message}: below the target"
                     f" {result.target_recall}; run `pgreembed tune --target {target.name}"
                     f" --column {'live' if slot.role == 'live' else 'incoming'}"
                     f" --recall {result.target_recall}`", result.as_dict())
        else:
            self.add(OK, target.name, "recall", f"{message} (target {result.target_recall})",
                     result.as_dict())

    def _hints(self, target: Target, ext: _Extension, methods: set[str]) -> None:
        """Filtered ANN queries (WHERE ... ORDER BY v <=> q LIMIT k) can return < k rows."""
        if "hnsw" in methods:
            ef = self.one("SELECT current_setting('hnsw.ef_search', true)")[0]
            iterative = self.one("SELECT current_setting('hnsw.iterative_scan', true)")[0]
            if ext.at_least_0_8:
                advice = ("SET hnsw.iterative_scan = relaxed_order (or strict_order) so the"
                          " scan continues until enough rows pass the filter"
                          if iterative in (None, "off") else
                          f"hnsw.iterative_scan = {iterative} is on")
            else:
                advice = ("pgvector >= 0.8 adds hnsw.iterative_scan for this;"
                          " meanwhile raise hnsw.ef_search")
            self.add(OK, target.name, "hint_hnsw", f"hint: HNSW returns at most"
                     f" hnsw.ef_search = {ef} candidates before a WHERE filter; filtered queries"
                     f" can come back short: {advice}")
        if "ivfflat" in methods:
            probes = self.one("SELECT current_setting('ivfflat.probes', true)")[0]
            self.add(OK, target.name, "hint_ivfflat", f"hint: IVFFlat searches ivfflat.probes"
                     f" = {probes} lists; raise it (about sqrt(lists)) for recall, and for"
                     " filtered queries use ivfflat.iterative_scan (pgvector >= 0.8)")


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
    with connect(settings.database_url, autocommit=True, vector=False) as conn:
        conn.execute("SET default_transaction_read_only = on")
        conn.execute(sql.SQL("SET statement_timeout = {}").format(
            sql.Literal(f"{int(statement_timeout * 1000)}ms")))
        conn.execute("SET lock_timeout = '5s'")
        doctor = _Doctor(conn, settings, sample_rows, worker_processes)
        ext = None
        try:
            ext = doctor.extension()
        except psycopg.Error as exc:
            doctor.add(ERROR, None, "pgvector", f"cannot inspect extensions: {redact(str(exc))}")
        doctor.guarded(None, "connections", doctor.connections)
        for target in chosen:
            doctor.guarded(target.name, "target", functools.partial(doctor.target, target, ext))
            if verify_rows > 0:
                doctor.guarded(target.name, "verify", functools.partial(
                    doctor.verify, target, verify_rows, tolerance, announce))
            if recall_queries > 0:
                doctor.guarded(target.name, "recall", functools.partial(
                    doctor.recall, target, recall_queries, recall_k, recall_target))
        return doctor.findings


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(f.level == ERROR for f in findings) else 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pgreembed.config import load_settings

    settings = load_settings(args.config)
    # With --json, stdout is the JSON document alone: the spend notice goes to stderr.
    notices = sys.stderr if args.json else sys.stdout
    findings = run_doctor(settings, targets=args.target or None, sample_rows=args.sample,
                          worker_processes=args.worker_processes,
                          statement_timeout=args.statement_timeout,
                          verify_rows=args.verify, tolerance=args.tolerance,
                          recall_queries=args.recall_queries if args.recall else 0,
                          recall_k=args.k, recall_target=args.recall_target,
                          announce=lambda line: print(line, file=notices, flush=True))
    if args.json:
        print(json.dumps([f.as_dict() for f in findings], indent=2))
    else:
        for f in findings:
            print(f"{f.level.upper():<5}  {f.target or '(server)'}: {f.message}")
        errors = sum(f.level == ERROR for f in findings)
        warnings = sum(f.level == WARN for f in findings)
        print(f"doctor: {errors} error(s), {warnings} warning(s)")
    return exit_code(findings)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if not 0 < value <= 1000:
        raise argparse.ArgumentTypeError(f"must be in 1..1000, got {value}")
    return value


def _recall(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a recall is in (0, 1], got {value}")
    return value


def _similarity(text: str) -> float:
    value = float(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a cosine similarity is in [-1, 1], got {value}")
    return value


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `pgreembed doctor` to the CLI's subcommands."""
    help_text = "read-only health checks of the targets (exit 1 if any error)"
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "doctor", help=help_text, description=help_text)
    parser.set_defaults(handler=cmd_doctor)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--target", action="append", help="only this target (repeatable)")
    parser.add_argument("--sample", type=int, default=1000, metavar="ROWS",
                        help="vectors sampled for the zero/norm checks")
    parser.add_argument("--worker-processes", type=int, default=2, metavar="N",
                        help="Dramatiq worker processes across all machines"
                             " (replicas x --processes), for the connection check")
    parser.add_argument("--statement-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="longest any single check may run")
    parser.add_argument("--verify", type=_non_negative_int, default=0, metavar="N",
                        help="re-embed N random rows per vector column with its recorded"
                             " model and report rows whose stored vector disagrees (spends"
                             " tokens; the count is printed first)")
    parser.add_argument("--tolerance", type=_similarity, default=DEFAULT_TOLERANCE,
                        metavar="T", help="--verify: lowest cosine similarity that agrees"
                                          f" (default {DEFAULT_TOLERANCE})")
    parser.add_argument("--recall", action="store_true",
                        help="measure each ANN index's recall@k against exact search at the"
                             " settings pgreembed.search applies; warn below the target (no"
                             " tokens: sample queries are stored vectors)")
    parser.add_argument("--recall-queries", type=_positive_int, default=50, metavar="N",
                        help="--recall: sample queries per index (each costs one sequential"
                             " scan for the exact answer; default 50, at most 1000)")
    parser.add_argument("--recall-target", type=_recall, metavar="R",
                        help="--recall: lowest acceptable recall (default: the target `tune`"
                             " was given, else 0.95)")
    parser.add_argument("--k", type=_positive_int, default=10,
                        help="--recall: recall@k (default 10)")
    return parser
