"""Search a chunked target by parent: the best chunk of each of the `limit` nearest parents.

The nearest chunks often crowd into a few parents (a long document matches with many of
its chunks), so the statement takes `limit * 8` candidate chunks, keeps each parent's
best, and asks again with 4x the candidates while fewer than `limit` parents came back
and more chunks exist; index scans are iterative (pgvector >= 0.8) so that an HNSW index
gives as many candidates as asked for. It runs through `search.on_live_column`: the query
is embedded with the live model and the statement checks the registry in its own
snapshot, as `search`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config import Settings
from pgreembed.config.chunking import CHUNK_TEXT
from pgreembed.config.distances import DISTANCES, canonical_distance
from pgreembed.errors import ConfigError
from pgreembed.operations.search import LIVE_CHECK, on_live_column
from pgreembed.store import server_versions
from pgreembed.store.chunks import parent_key
from pgreembed.store.slots import Slot

FIRST_CANDIDATES = 8  # chunks per parent asked for at first
GROWTH = 4
MAX_CANDIDATES = 100_000

_GROUPED = LIVE_CHECK + """,
candidates AS MATERIALIZED (
    SELECT {keys}, chunk_seq, {chunk} AS chunk, {vector} {op} %(query)s::{type} AS distance
    FROM {table}
    WHERE (SELECT live FROM pgreembed_registry) AND {vector} IS NOT NULL
    ORDER BY distance
    LIMIT %(candidates)s)
SELECT r.live, (SELECT count(*) FROM candidates), b.chunk_seq, b.chunk, b.distance, {b_key}
FROM pgreembed_registry r LEFT JOIN LATERAL (
    SELECT * FROM (SELECT DISTINCT ON ({key}) * FROM candidates ORDER BY {key}, distance
    ) best
    ORDER BY distance
    LIMIT %(limit)s) b ON true
"""


def _iterative_scans(conn: psycopg.Connection) -> None:
    """An HNSW scan returns at most hnsw.ef_search rows (40 by default), fewer than the
    candidates asked for; with iterative scans (pgvector >= 0.8) it goes on until it has
    them. Set where off, so a mode the operator chose (`pgreembed tune`) stays."""
    if not server_versions.read(conn).supports(server_versions.ITERATIVE_SCAN):
        return
    conn.execute("SELECT set_config(name, 'relaxed_order', true) FROM unnest(%s::text[])"
                 " AS s(name) WHERE coalesce(current_setting(name, true), 'off') = 'off'",
                 (["hnsw.iterative_scan", "ivfflat.iterative_scan"],), prepare=False)


@dataclass(frozen=True)
class ParentHit:
    """A parent and its chunk nearest to the query. `key`: the parent's key, a tuple
    (the primary key's order) for a composite key."""

    key: Any
    chunk_seq: int
    chunk: str
    distance: float


def search_parents(conn: psycopg.Connection, settings: Settings, target_name: str,
                   query: str, limit: int = 10, distance: str | None = None,
                   index_settings: Mapping[str, str | int] | None = None) -> list[ParentHit]:
    """The `limit` parents nearest to `query` (by their nearest chunk), across any swap."""
    target = settings.target(target_name)
    if target.parent is None:
        raise ConfigError(f"target {target_name!r} is not chunked: use search()")
    operator = sql.SQL(DISTANCES[canonical_distance(distance or target.distance)])

    def run(slot: Slot, vector: str) -> list[tuple[Any, ...]]:
        # In search's scope: the app's transaction as it is, or a short one of our own.
        key = parent_key(conn, target)
        # The key columns as pgr_key_0.. (a parent column may be named `key` or `chunk`).
        names = [sql.Identifier(f"pgr_key_{i}") for i in range(len(key.columns))]
        statement = sql.SQL(_GROUPED).format(
            keys=sql.SQL(", ").join(sql.SQL("{} AS {}").format(sql.Identifier(c), n)
                                    for c, n in zip(key.columns, names, strict=True)),
            key=sql.SQL(", ").join(names),
            b_key=sql.SQL(", ").join(sql.SQL("b.{}").format(n) for n in names),
            chunk=sql.Identifier(CHUNK_TEXT), vector=slot.vector,
            op=operator, type=sql.SQL(slot.vector_type), table=slot.table)
        candidates = limit * FIRST_CANDIDATES
        # A savepoint rolled back once the rows are read: our SET LOCALs end with it,
        # inside the app's transaction as in ours.
        with conn.transaction(force_rollback=True):
            _iterative_scans(conn)
            while True:
                rows = conn.execute(statement, {
                    "slot": slot.id, "column": slot.vector_column, "query": vector,
                    "candidates": candidates, "limit": limit}, prepare=False).fetchall()
                found = sum(1 for r in rows if r[4] is not None)
                exhausted = rows[0][1] < candidates  # the scan had no more chunks to give
                if (not rows[0][0] or found >= limit or exhausted
                        or candidates >= MAX_CANDIDATES):
                    return [(*r[:5], key.value(r[5:])) for r in rows]
                candidates = min(candidates * GROWTH, MAX_CANDIDATES)

    rows = on_live_column(conn, settings, target_name, query, run, index_settings)
    return [ParentHit(k, seq, chunk, float(d)) for _, _, seq, chunk, d, k in rows
            if d is not None]
