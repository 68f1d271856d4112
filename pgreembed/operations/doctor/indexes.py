"""Checks of a vector column's ANN indexes: missing, INVALID, or an operator class
that does not match the distance the app queries with; and the hints they lead to."""

from __future__ import annotations

from psycopg import sql

from pgreembed.config import Target
from pgreembed.config.distances import DISTANCES, opclass_distance
from pgreembed.operations.doctor.base import (
    ANN_METHODS,
    DoctorBase,
    Extension,
)
from pgreembed.operations.doctor.findings import ERROR, OK, WARN
from pgreembed.store import catalog, server_versions
from pgreembed.store.slots import app_table


class IndexChecks(DoctorBase):
    """The checks that read the catalog's indexes of a vector column."""

    def _indexes(self, target: Target, oid: int, where: str, ext: Extension) -> None:
        indexes = catalog.indexes(self.conn, str(oid))
        qualified = f"{target.schema}.{target.table}"
        for index in indexes:
            if index.valid:
                continue
            name = index.name
            drop = self.statement(sql.SQL("DROP INDEX CONCURRENTLY {};").format(
                sql.Identifier(target.schema, name)))
            if index.building:
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
        valid_ann = [i for i in indexes if i.method in ANN_METHODS and i.valid
                     and target.vector_column in i.uses]
        distance = target.distance
        operator = DISTANCES[distance]
        wanted_ops = f"{self.wanted_type(target)}_{distance}_ops"
        if not valid_ann:
            create = self._create_index(target, "hnsw", wanted_ops, ext)
            self.add(WARN, target.name, "index", f"{where} has no valid HNSW or IVFFlat index:"
                     f" every similarity search scans the whole table; e.g. `{create}`",
                     {"sql": [create]})
            return
        served = any(opclass_distance(o) == distance for i in valid_ann for o in i.opclasses)
        for index in valid_ann:
            name, method, ops = index.name, index.method, ", ".join(index.opclasses)
            if any(opclass_distance(o) == distance for o in index.opclasses):
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
        self._hints(target, ext, {i.method for i in valid_ann})

    def _create_index(self, target: Target, method: str, opclass: str, ext: Extension
                      ) -> str:
        """The advised ANN index (the opclass qualified by pgvector's schema)."""
        return self.statement(sql.SQL(
            "CREATE INDEX CONCURRENTLY ON {table} USING {method} ({column} {opclass});"
        ).format(table=app_table(target),
                 method=sql.Identifier(method), column=sql.Identifier(target.vector_column),
                 opclass=sql.Identifier(ext.schema, opclass)))

    def _hints(self, target: Target, ext: Extension, methods: set[str]) -> None:
        """Filtered ANN queries (WHERE ... ORDER BY v <=> q LIMIT k) can return < k rows."""
        if "hnsw" in methods:
            ef = self.one("SELECT current_setting('hnsw.ef_search', true)")[0]
            iterative = self.one("SELECT current_setting('hnsw.iterative_scan', true)")[0]
            missing = server_versions.read(self.conn).missing(server_versions.ITERATIVE_SCAN)
            if missing is None:
                advice = ("SET hnsw.iterative_scan = relaxed_order (or strict_order) so the"
                          " scan continues until enough rows pass the filter"
                          if iterative in (None, "off") else
                          f"hnsw.iterative_scan = {iterative} is on")
            else:
                advice = f"raise hnsw.ef_search ({missing})"
            self.add(OK, target.name, "hint_hnsw", f"hint: HNSW returns at most"
                     f" hnsw.ef_search = {ef} candidates before a WHERE filter; filtered queries"
                     f" can come back short: {advice}")
        if "ivfflat" in methods:
            probes = self.one("SELECT current_setting('ivfflat.probes', true)")[0]
            self.add(OK, target.name, "hint_ivfflat", f"hint: IVFFlat searches ivfflat.probes"
                     f" = {probes} lists; raise it (about sqrt(lists)) for recall, and for"
                     " filtered queries use ivfflat.iterative_scan (pgvector 0.8 or newer)")
