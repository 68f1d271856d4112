"""Checks of a vector column's contents: type and size, NULLs, mixed dimensions,
models, zero or non-normalised vectors, rows with no text."""

from __future__ import annotations

from typing import Any

from psycopg import sql

from pgreembed.config import Target
from pgreembed.operations.doctor.base import (
    Column,
    DoctorBase,
    Extension,
)
from pgreembed.operations.doctor.findings import ERROR, OK, WARN
from pgreembed.store import catalog
from pgreembed.store.sampling import first_percent, tablesample
from pgreembed.store.slots import (
    load_slots,
    registry_exists,
    text_expression,
)
from pgreembed.store.texts import no_text
from pgreembed.store.trusted_sql import NO_PARAMS


class ColumnChecks(DoctorBase):
    """The checks that read a vector column (bounded by sample_rows where they scan)."""

    def _column(self, oid: int, name: str) -> Column | None:
        found = catalog.column(self.conn, str(oid), name)
        return None if found is None else Column(found.attnum, found.type_name, found.typmod)

    def _column_type(self, target: Target, column: Column, where: str) -> bool:
        """Report the column's type; True when it is a pgvector type worth checking further."""
        wanted_type = self.wanted_type(target)
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
            hint = (f"; if a migration made it {column.declared}, set vector_type ="
                    f" {column.type_name!r} in the config" if column.typmod ==
                    target.dimensions else "")
            self.add(ERROR, target.name, "vector_column", f"{where} is {column.declared} but"
                     f" {target.model_key} needs {wanted} (a model or storage change is a"
                     f" migration){hint}")
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
                    ext: Extension, column: Column, where: str) -> None:
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
            migrated = self.conn.execute(
                "SELECT count(*) FROM pgreembed.migrations WHERE target = %s AND phase IN"
                " ('swapped', 'rolled_back', 'finalized')", (target.name,)).fetchone()
            advice = (f"a migration made it live: set provider = {slot.provider!r}, model ="
                      f" {slot.model!r}, dimensions = {slot.dimensions}, vector_column ="
                      f" {slot.vector_column!r} in the config" if migrated and migrated[0]
                      else "run `pgreembed init` to re-embed in place with the config's model")
            self.add(WARN, target.name, "models", f"the live column is {live_where}"
                     f" ({slot.model_key}) but the config says {where} ({target.model_key}):"
                     f" {advice}")
        if self.conn.execute("SELECT to_regclass(%s)", (slot.state_table.as_string(self.conn),)
                             ).fetchone() in (None, (None,)):
            self.add(WARN, target.name, "models", f"state table of {live_where} is missing:"
                     " run `pgreembed init`")
            return
        rows = self.conn.execute(sql.SQL(
            """
            SELECT coalesce(m.key, '(no record)'), count(*)
            FROM {rows} LEFT JOIN pgreembed.models m ON m.id = s.pgr_model_id
            WHERE a.{vector} IS NOT NULL
            GROUP BY 1 ORDER BY 2 DESC
            """).format(rows=slot.rows_with_state(outer=True), vector=slot.vector)).fetchall()
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
               ext: Extension, column: Column, where: str) -> None:
        norm_fn = "vector_norm" if column.type_name == "vector" else "l2_norm"
        tolerance = 1e-3 if column.type_name == "vector" else 1e-2
        # Block sampling reads only a few pages of a big table; the whole table if they
        # hold no vector.
        percent = first_percent(self.conn, table, self.sample_rows)
        samples = [tablesample(percent)] + ([tablesample(100.0)] if percent < 100.0 else [])
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
        count = int(self.one(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
            table, no_text(text_expression(target))), NO_PARAMS)[0])
        qualified = f"{target.schema}.{target.table}"
        if count:
            self.add(WARN, target.name, "missing_text", f"{qualified}: {count} rows have NULL"
                     " or empty text; they are recorded as failures and never get a vector")
        else:
            self.add(OK, target.name, "missing_text", f"{qualified}: every row has text")
