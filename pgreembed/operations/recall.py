"""Recall@k of a column's ANN index against exact search on the same column, and latency.

Shared by `migrate compare`, `tune` and `doctor --recall`. Ground truth is the same
query run with index scans disabled (`SET LOCAL enable_indexscan = off`: a
sequential scan and a top-k sort), never by dropping anything. What bounds its
cost to the app:

- each query (exact or ANN) runs in a READ ONLY transaction of its own, committed
  at once: no lock outlives one query, so a swap or `CREATE INDEX` waiting for
  ACCESS EXCLUSIVE is never held up by more than one of our statements;
- every exact query is one sequential scan of the table: `queries` x rows reads,
  so the number of queries is capped (MAX_QUERIES) and each exact query has a
  local statement_timeout (DEFAULT_EXACT_TIMEOUT_MS unless the caller says);
- the ANN query runs with `enable_seqscan = off` (local), so what is measured is
  the index, as the app gets it whenever the planner picks the index.

Sample queries cost no tokens: the stored vectors of randomly sampled rows (the
distribution the app's data has). A row's own vector finds the row itself, which
every index finds too, so recall@k here counts the other k-1 neighbours as well.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psycopg
from pgvector import HalfVector, Vector
from psycopg import sql
from psycopg.pq import TransactionStatus

from pgreembed.config.distances import DISTANCES, opclass_distance
from pgreembed.operations.defaults import (  # noqa: F401  (re-exported: recall's own)
    DEFAULT_EXACT_TIMEOUT_MS,
    DEFAULT_K,
    DEFAULT_QUERIES,
    MAX_QUERIES,
)
from pgreembed.store import catalog
from pgreembed.store.sampling import tablesample, widening
from pgreembed.store.slots import Slot
from pgreembed.store.trusted_sql import trusted_sql


@dataclass(frozen=True)
class AnnIndex:
    """The valid HNSW/IVFFlat index a column's searches use, and its build options."""

    name: str
    method: str  # hnsw | ivfflat
    distance: str  # a key of DISTANCES
    options: Mapping[str, str]  # reloptions: m, ef_construction, lists

    @property
    def lists(self) -> int:
        return int(self.options.get("lists", 100))  # pgvector's default

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "distance": self.distance,
                "options": dict(self.options)}


def ann_index(conn: psycopg.Connection, slot: Slot) -> AnnIndex | None:
    """The slot's valid ANN index (the one serving the target's distance if several)."""
    found = []
    for index in catalog.indexes(conn, catalog.regclass(conn, slot.table)):
        if not (index.valid and index.method in ("hnsw", "ivfflat") and index.columns
                and index.columns[0] == slot.vector_column and index.opclasses):
            continue
        distance = opclass_distance(index.opclasses[0])
        if distance is not None and distance in DISTANCES:
            found.append(AnnIndex(index.name, index.method, distance, index.options))
    preferred = [i for i in found if i.distance == slot.target.distance]
    chosen = preferred or found
    return chosen[0] if chosen else None


def vector_text(slot: Slot, values: Any) -> str:
    """A vector as pgvector text, cast in SQL: needs no adapter on the connection."""
    kind = HalfVector if slot.vector_type == "halfvec" else Vector
    return str(kind(np.asarray(values, dtype=np.float32)).to_text())


@dataclass(frozen=True)
class Query:
    """One query vector (pgvector text); `key` is the row it was taken from, if any."""

    vector: str
    key: Any = None


class ColumnSearch:
    """Exact and ANN top-k searches on one slot's column, each in its own short,
    read-only transaction. `filter_sql` is trusted operator input (like text_sql)."""

    def __init__(self, conn: psycopg.Connection, slot: Slot, k: int, distance: str,
                 filter_sql: str | None = None,
                 exact_timeout_ms: int = DEFAULT_EXACT_TIMEOUT_MS) -> None:
        if conn.info.transaction_status != TransactionStatus.IDLE:
            raise psycopg.InterfaceError("recall: the connection must be idle")
        self.conn, self.slot, self.k = conn, slot, k
        self.exact_timeout_ms = exact_timeout_ms
        where = sql.SQL("{} IS NOT NULL").format(slot.vector)
        if filter_sql:
            where = sql.SQL("{} AND ({})").format(where, trusted_sql(filter_sql))
        self.statement = sql.SQL(
            "SELECT {pk} FROM {table} WHERE {where} ORDER BY {vector} {op} %s::{type} LIMIT %s"
        ).format(pk=slot.pk, table=slot.table, where=where, vector=slot.vector,
                 op=sql.SQL(DISTANCES[distance]), type=sql.SQL(slot.vector_type))

    def _run(self, query: Query, settings: Mapping[str, str]) -> tuple[list[Any], float]:
        with self.conn.transaction():
            self.conn.execute("SET TRANSACTION READ ONLY")
            self.conn.execute("SELECT set_config(name, value, true)"
                              " FROM unnest(%s::text[], %s::text[]) AS s(name, value)",
                              (list(settings), list(settings.values())))
            started = time.perf_counter()
            keys = [r[0] for r in self.conn.execute(self.statement, (query.vector, self.k))]
            return keys, time.perf_counter() - started

    def exact(self, query: Query) -> list[Any]:
        """The true top-k: index scans off, so a sequential scan and a sort."""
        return self._run(query, {"enable_indexscan": "off", "enable_bitmapscan": "off",
                                 "statement_timeout": str(self.exact_timeout_ms)})[0]

    def ann(self, query: Query, settings: Mapping[str, str]) -> tuple[list[Any], float]:
        """The index's top-k under `settings` (e.g. hnsw.ef_search) and its latency (s)."""
        return self._run(query, {**settings, "enable_seqscan": "off"})


@dataclass
class Measurement:
    """Recall@k and latency of one column's index under one set of settings."""

    settings: dict[str, str]
    recall: float
    p50_ms: float
    p99_ms: float
    queries: int
    short: int = 0  # queries for which the index returned fewer rows than exact search
    reached: bool | None = None  # tune: whether `recall` reaches the target

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "recall": round(self.recall, 4),
                "p50_ms": round(self.p50_ms, 3), "p99_ms": round(self.p99_ms, 3),
                "queries": self.queries, "short": self.short, "reached": self.reached}


def recall_at_k(found: Sequence[Sequence[Any]], truth: Sequence[Sequence[Any]]) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (queries with no true hit skipped)."""
    scores = [len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True) if t]
    return float(np.mean(scores)) if scores else 1.0


def percentile_ms(seconds: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1000.0, q)) if seconds else 0.0


@dataclass
class GroundTruth:
    """Queries and their exact top-k on one column, measured once, reused per setting."""

    search: ColumnSearch
    queries: list[Query]
    exact: list[list[Any]] = field(default_factory=list)

    @classmethod
    def measure(cls, search: ColumnSearch, queries: list[Query]) -> GroundTruth:
        return cls(search, queries, [search.exact(q) for q in queries])

    def ann(self, settings: Mapping[str, str]) -> tuple[Measurement, list[list[Any]]]:
        """The index's recall and latency under `settings` (and what it returned)."""
        found, seconds = [], []
        for query in self.queries:
            keys, took = self.search.ann(query, settings)
            found.append(keys)
            seconds.append(took)
        short = sum(len(f) < len(t) for f, t in zip(found, self.exact, strict=True))
        return Measurement(dict(settings), recall_at_k(found, self.exact),
                           percentile_ms(seconds, 50), percentile_ms(seconds, 99),
                           len(self.queries), short), found


def sample_rows(conn: psycopg.Connection, slot: Slot, size: int,
                select: sql.Composable, where: sql.Composable) -> list[tuple[Any, ...]]:
    """Up to `size` random rows of the slot's table matching `where` (over alias `a`),
    never scanning a big table for a small sample (see store.sampling); each attempt in
    its own short transaction."""
    def fetch(percent: float) -> list[tuple[Any, ...]]:
        with conn.transaction():
            return [tuple(r) for r in conn.execute(sql.SQL(
                "SELECT {select} FROM {table} AS a {sample} WHERE {where}"
                " ORDER BY random() LIMIT %s").format(
                    select=select, table=slot.table, sample=tablesample(percent), where=where),
                (size,))]
    return widening(conn, slot.table, size, fetch)


def stored_vector_queries(conn: psycopg.Connection, slot: Slot, size: int,
                          filter_sql: str | None = None) -> list[Query]:
    """Queries that cost no tokens: the stored vectors of `size` random rows (matching
    the filter, so a filtered query has neighbours to find)."""
    where = sql.SQL("a.{} IS NOT NULL").format(slot.vector)
    if filter_sql:
        where = sql.SQL("{} AND ({})").format(where, trusted_sql(filter_sql))
    rows = sample_rows(conn, slot, size, sql.SQL("a.{}, a.{}::text").format(
        slot.pk, slot.vector), where)
    return [Query(str(vector), key) for key, vector in rows]


def stored_vector_truth(conn: psycopg.Connection, slot: Slot, queries: int, k: int,
                        filter_sql: str | None = None,
                        exact_timeout_ms: int = DEFAULT_EXACT_TIMEOUT_MS
                        ) -> tuple[AnnIndex | None, GroundTruth | None]:
    """What `tune` and `doctor --recall` start from: the slot's ANN index and the exact
    top-k of up to `queries` (at most MAX_QUERIES) stored-vector queries. (None, None)
    without an index; (index, None) without a row (matching the filter) to query with."""
    index = ann_index(conn, slot)
    if index is None:
        return None, None
    sample = stored_vector_queries(conn, slot, min(queries, MAX_QUERIES), filter_sql)
    if not sample:
        return index, None
    search = ColumnSearch(conn, slot, k, index.distance, filter_sql, exact_timeout_ms)
    return index, GroundTruth.measure(search, sample)
