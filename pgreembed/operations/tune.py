"""`pgreembed tune`: the smallest index setting that reaches a recall target, measured.

For the column's ANN index it sweeps the query-time setting upwards (HNSW:
`hnsw.ef_search`; IVFFlat: `ivfflat.probes`; with `--filter`, each value also with
pgvector 0.8's iterative scan, `hnsw.iterative_scan = strict_order` or
`ivfflat.iterative_scan = relaxed_order`, and for HNSW a raised
`hnsw.max_scan_tuples` if nothing else gets there), measures recall@k against exact
search on sample queries (see `pgreembed.operations.recall`) and the latency, and stops at
the first setting that reaches the target: that is the recommendation. It is
recorded for the slot (`pgreembed.index_settings`), and `pgreembed.operations.search` applies
it to its own statements. Tuning writes nothing else and spends no tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pgreembed.config import Settings, Target
from pgreembed.errors import TuneError
from pgreembed.operations.defaults import DEFAULT_RECALL
from pgreembed.operations.recall import (
    DEFAULT_EXACT_TIMEOUT_MS,
    DEFAULT_K,
    DEFAULT_QUERIES,
    AnnIndex,
    GroundTruth,
    Measurement,
    stored_vector_truth,
)
from pgreembed.store import index_settings, server_versions
from pgreembed.store.pool import connect
from pgreembed.store.slots import Slot, load_slots
from pgreembed.store.versions import upgrade

HNSW_EF_SEARCH = (10, 20, 40, 64, 100, 150, 200, 300, 400, 600, 800, 1000)  # pgvector max


HNSW_MAX_SCAN_TUPLES = (50_000, 200_000)  # pgvector's default is 20,000


PRIMARY = {"hnsw": "hnsw.ef_search", "ivfflat": "ivfflat.probes"}


ITERATIVE = {"hnsw": ("hnsw.iterative_scan", "strict_order"),
             "ivfflat": ("ivfflat.iterative_scan", "relaxed_order")}


def column_slot(conn: psycopg.Connection, target: Target, column: str) -> Slot:
    """`live`: the live column; `incoming`: the one a swap (or rollback) would make live."""
    slots = load_slots(conn, target)
    wanted = ("live",) if column == "live" else ("next", "old")
    for slot in slots:
        if slot.role in wanted:
            return slot
    if column == "live":
        raise TuneError(f"target {target.name!r} has no live column: run `pgreembed init`")
    raise TuneError(f"target {target.name!r} has no incoming column: no migration is open")


def primary_values(index: AnnIndex, k: int) -> list[int]:
    """The swept values, ascending: ef_search from k (fewer returns < k rows) to 1000;
    probes doubling from 1 to the index's lists."""
    if index.method == "hnsw":
        return sorted({min(k, 1000), *(v for v in HNSW_EF_SEARCH if v > k)})
    values, probes = [], 1
    while probes < index.lists:
        values.append(probes)
        probes *= 2
    return [*values, index.lists]


def sweep(index: AnnIndex, k: int, filtered: bool, iterative: bool
          ) -> Iterator[dict[str, str]]:
    """Settings to measure, cheapest first (with a filter: each value without, then with,
    the iterative scan)."""
    primary = PRIMARY[index.method]
    name, mode = ITERATIVE[index.method]
    for value in primary_values(index, k):
        if filtered and iterative:
            yield {primary: str(value), name: "off"}
            yield {primary: str(value), name: mode}
        else:
            yield {primary: str(value)}


def escalation(index: AnnIndex, k: int) -> Iterator[dict[str, str]]:
    """With a filter and HNSW, if no swept setting reached the target: let the iterative
    scan visit more tuples at the largest ef_search."""
    if index.method == "hnsw":
        name, mode = ITERATIVE["hnsw"]
        for tuples in HNSW_MAX_SCAN_TUPLES:
            yield {"hnsw.ef_search": str(primary_values(index, k)[-1]), name: mode,
                   "hnsw.max_scan_tuples": str(tuples)}


@dataclass
class TuneResult:
    target: str
    column: str
    role: str
    model: str
    index: AnnIndex
    k: int
    target_recall: float
    filter_sql: str | None
    current: Measurement  # at the server's settings, before anything of ours
    rows: list[Measurement]
    recommended: Measurement | None
    statements: list[str]
    notes: list[str] = field(default_factory=list)  # what was not tried, and why

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "column": self.column, "role": self.role,
                "model": self.model, "index": self.index.as_dict(), "k": self.k,
                "target_recall": self.target_recall, "filter": self.filter_sql,
                "queries": self.current.queries, "current": self.current.as_dict(),
                "sweep": [m.as_dict() for m in self.rows],
                "recommended": None if self.recommended is None else
                self.recommended.as_dict(), "set_statements": self.statements,
                "notes": self.notes}


def server_values(conn: psycopg.Connection, names: list[str]) -> dict[str, str]:
    """What the server would use now for each setting (pgvector's default if unset)."""
    values = {}
    for name in names:
        row = conn.execute("SELECT current_setting(%s, true)", (name,)).fetchone()
        if row and row[0] is not None:
            values[name] = str(row[0])
    return values


def tune(settings: Settings, target: Target, *, column: str = "live",
         recall_target: float = DEFAULT_RECALL, k: int = DEFAULT_K,
         filter_sql: str | None = None, queries: int = DEFAULT_QUERIES,
         exact_timeout_ms: int = DEFAULT_EXACT_TIMEOUT_MS, record: bool = True) -> TuneResult:
    """Sweep, measure, recommend and (if `record`) record; see the module docstring."""
    with connect(settings.database_url, autocommit=True) as conn:
        slot = column_slot(conn, target, column)
        index, truth = stored_vector_truth(conn, slot, queries, k, filter_sql,
                                           exact_timeout_ms)
        where = f"{target.schema}.{target.table}.{slot.vector_column}"
        if index is None:
            raise TuneError(f"{where} has no valid HNSW or IVFFlat index: nothing to tune"
                            " (`pgreembed doctor` shows how to build one)")
        if truth is None:
            raise TuneError(f"{where}: no row with a vector"
                            f"{' matches the filter' if filter_sql else ''}: nothing to"
                            " measure")
        # (The exact searches loaded pgvector's library: its settings are defined now.)
        missing = server_versions.read(conn).missing(server_versions.ITERATIVE_SCAN)
        iterative = missing is None
        notes = [f"iterative scans not tried: {missing}"] if filter_sql and missing else []
        current, _ = truth.ann({})
        current.settings = server_values(conn, [PRIMARY[index.method]])
        rows: list[Measurement] = []
        recommended = _first_reaching(truth, sweep(index, k, bool(filter_sql), iterative),
                                      recall_target, rows)
        if recommended is None and filter_sql and iterative:
            recommended = _first_reaching(truth, escalation(index, k), recall_target, rows)
        statements: list[str] = []
        if recommended is not None:
            statements = index_settings.set_statements(conn, recommended.settings)
            if record:
                with conn.transaction():
                    upgrade(conn, repeatable=False)  # a database init'ed before these tables
                    index_settings.record(
                        conn, slot.id, recommended.settings, index_name=index.name, k=k,
                        target_recall=recall_target, recall=recommended.recall,
                        filter_sql=filter_sql)
    return TuneResult(target.name, slot.vector_column, slot.role, slot.model_key, index, k,
                      recall_target, filter_sql, current, rows, recommended, statements, notes)


def _first_reaching(truth: GroundTruth, candidates: Iterator[dict[str, str]],
                    recall_target: float, rows: list[Measurement]) -> Measurement | None:
    for candidate in candidates:
        measured, _ = truth.ann(candidate)
        measured.reached = measured.recall >= recall_target
        rows.append(measured)
        if measured.reached:
            return measured
    return None


def settings_text(settings: dict[str, str]) -> str:
    return ", ".join(f"{name}={value}" for name, value in settings.items()) or "(none)"
