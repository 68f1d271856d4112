"""Search a chunked target by parent: the best chunk of each of the `limit` nearest parents.

The nearest chunks often crowd into a few parents (a long document matches with many of
its chunks), so the statement takes `limit * 8` candidate chunks, keeps each parent's
best, and asks again with 4x the candidates while fewer than `limit` parents came back
and more chunks exist. It runs through `search.on_live_column`: the query is embedded with
the live model and the statement checks the registry in its own snapshot, as `search`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.chunking.config import CHUNK_TEXT
from pgreembed.config import Settings
from pgreembed.distances import DISTANCES, canonical_distance
from pgreembed.errors import ConfigError
from pgreembed.operations.search import LIVE_CHECK, on_live_column
from pgreembed.store.chunks import parent_key
from pgreembed.store.slots import Slot

FIRST_CANDIDATES = 8  # chunks per parent asked for at first
GROWTH = 4
MAX_CANDIDATES = 100_000

_GROUPED = LIVE_CHECK + """,
candidates AS MATERIALIZED (
    SELECT {key} AS key, chunk_seq, {chunk} AS chunk, {vector} {op} %(query)s::{type} AS distance
    FROM {table}
    WHERE (SELECT live FROM pgreembed_registry) AND {vector} IS NOT NULL
    ORDER BY distance
    LIMIT %(candidates)s)
SELECT r.live, (SELECT count(*) FROM candidates), b.key, b.chunk_seq, b.chunk, b.distance
FROM pgreembed_registry r LEFT JOIN LATERAL (
    SELECT * FROM (SELECT DISTINCT ON (key) * FROM candidates ORDER BY key, distance) best
    ORDER BY distance
    LIMIT %(limit)s) b ON true
"""


@dataclass(frozen=True)
class ParentHit:
    """A parent and its chunk nearest to the query."""

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
        key = parent_key(conn, target)[0]
        statement = sql.SQL(_GROUPED).format(
            key=sql.Identifier(key), chunk=sql.Identifier(CHUNK_TEXT), vector=slot.vector,
            op=operator, type=sql.SQL(slot.vector_type), table=slot.table)
        candidates = limit * FIRST_CANDIDATES
        while True:
            rows = conn.execute(statement, {
                "slot": slot.id, "column": slot.vector_column, "query": vector,
                "candidates": candidates, "limit": limit}, prepare=False).fetchall()
            found = sum(1 for r in rows if r[2] is not None)
            exhausted = rows[0][1] < candidates  # every chunk with a vector was a candidate
            if (not rows[0][0] or found >= limit or exhausted
                    or candidates >= MAX_CANDIDATES):
                return rows
            candidates = min(candidates * GROWTH, MAX_CANDIDATES)

    rows = on_live_column(conn, settings, target_name, query, run, index_settings)
    return [ParentHit(k, seq, chunk, float(d)) for _, _, k, seq, chunk, d in rows
            if d is not None]
