"""The app-side helper: embed a query with the target's *live* model and search.

The model and column are read from the registry on every call, so a swap
(`pgreembed migrate swap`) is picked up without a restart, and the helper never
prepares plans (which break when a swap changes a column type). It is handed the
app's connection, so it takes no lock beyond its own statements and leaves the
connection in the transaction state it found it in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from pgvector import HalfVector, Vector
from psycopg import sql
from psycopg.pq import TransactionStatus

from pgreembed.config import Settings
from pgreembed.config.distances import DISTANCES, canonical_distance
from pgreembed.embedding.providers import make_provider
from pgreembed.embedding.providers.base import QUERY
from pgreembed.errors import LiveColumnChanged, NotFoundError
from pgreembed.store.index_settings import apply_local
from pgreembed.store.index_settings import recorded as recorded_settings
from pgreembed.store.index_settings import validate as validate_settings
from pgreembed.store.slots import Slot, load_slots

# Each swap that lands between reading the live model and searching costs one more
# query embedding; this many in a row means swaps keep coming: say so, don't loop.
MAX_ATTEMPTS = 3

# One statement that searches and, in the same snapshot, checks that the registry
# still names the slot we embedded for as live under the column we search.
LIVE_CHECK = """
WITH pgreembed_registry AS MATERIALIZED (
    SELECT EXISTS (SELECT 1 FROM pgreembed.slots
                   WHERE id = %(slot)s AND role = 'live' AND vector_column = %(column)s)
           AS live)"""
_SEARCH = LIVE_CHECK + """
SELECT pgreembed_registry.live, hit.key, hit.text, hit.distance
FROM pgreembed_registry LEFT JOIN LATERAL (
    SELECT {pk} AS key, ({text})::text AS text, {vector} {op} %(query)s::{type} AS distance
    FROM {table}
    WHERE pgreembed_registry.live AND {vector} IS NOT NULL
    ORDER BY distance
    LIMIT %(limit)s) hit ON true
"""


@dataclass(frozen=True)
class Hit:
    key: Any
    text: str
    distance: float


def live_slot(conn: psycopg.Connection, settings: Settings, target_name: str) -> Slot:
    target = settings.target(target_name)
    for slot in load_slots(conn, target):
        if slot.role == "live":
            return slot
    raise NotFoundError(f"target {target_name!r} has no live column: run `pgreembed init`")


def search(conn: psycopg.Connection, settings: Settings, target_name: str, query: str,
           limit: int = 5, distance: str | None = None,
           index_settings: Mapping[str, str | int] | None = None) -> list[Hit]:
    """Nearest rows to `query` by `distance` (default: the target's), across any swap.

    The live model is read, the query embedded with it outside any transaction of
    ours, then ONE statement searches and checks that the registry still says that
    model is live under that column. In READ COMMITTED the statement locks the table
    while it is parsed (after a concurrent swap's exclusive lock is released, so
    names resolve against the committed catalog) and takes its snapshot after
    that, so check and column agree; if a swap happened in between, the query is
    re-embedded with the new live model and searched again.

    Connection handling: an idle connection (autocommit or not) gets short READ
    COMMITTED transactions of our own, committed before we return, so it holds no
    lock afterwards. Inside the app's open transaction we run in it and take no
    extra lock: the ACCESS SHARE lock our search statement takes stays until the
    app ends its transaction, as for any statement of its own. (At REPEATABLE READ
    or SERIALIZABLE the app's snapshot may predate a swap it cannot see: search
    outside such transactions.)

    Index settings: `pgreembed tune` records per column the smallest hnsw.ef_search /
    ivfflat.probes (and iterative scan) that reached its recall target; they are
    applied to the search statement with SET LOCAL (`set_config(name, value, true)`),
    unless `index_settings` is given ({} applies none: the session's own values count).
    In our own transaction they end with it. Inside the app's transaction the search
    statement runs in a savepoint that is rolled back once its rows are read: the
    settings end with it and the app's own values (SET or SET LOCAL) are in force
    again, as is the rest of its transaction; so does the statement's lock.
    """
    target = settings.target(target_name)
    operator = sql.SQL(DISTANCES[canonical_distance(distance or target.distance)])

    def run(slot: Slot, vector: str) -> list[tuple[Any, ...]]:
        return conn.execute(_statement(slot, operator), {
            "slot": slot.id, "column": slot.vector_column, "query": vector,
            "limit": limit}, prepare=False).fetchall()
    rows = on_live_column(conn, settings, target_name, query, run, index_settings)
    return [Hit(key, text, float(dist)) for _, key, text, dist in rows if dist is not None]


def on_live_column(conn: psycopg.Connection, settings: Settings, target_name: str,
                   query: str, run: Callable[[Slot, str], list[tuple[Any, ...]]],
                   index_settings: Mapping[str, str | int] | None = None
                   ) -> list[tuple[Any, ...]]:
    """`run(slot, query vector)` with `search`'s guarantees (see there): its rows' first
    value must be the registry check `_SEARCH` makes (the slot is still live under its
    column); on a swap in between the query is embedded again with the new live model."""
    for _ in range(MAX_ATTEMPTS):
        with _statement_scope(conn):
            slot = live_slot(conn, settings, target_name)
            chosen = (recorded_settings(conn, slot.id) if index_settings is None
                      else validate_settings(index_settings))
        vector = _embed_query(settings, slot, query)
        with _search_scope(conn, chosen):
            rows = run(slot, vector)
        if rows[0][0]:  # the registry still says `slot` is live: `vector` fits
            return rows
    raise LiveColumnChanged(
        f"target {target_name!r}: the live column changed during each of {MAX_ATTEMPTS}"
        " attempts of one search (a swap or rollback running over and over?)")


@contextlib.contextmanager
def _statement_scope(conn: psycopg.Connection) -> Iterator[None]:
    """Where our statements run: the app's open transaction as it is, otherwise a
    READ COMMITTED transaction of our own, over when the block ends (READ COMMITTED
    whatever the connection's default, see `search`)."""
    status = conn.info.transaction_status
    if status == TransactionStatus.INTRANS:
        yield
        return
    if status != TransactionStatus.IDLE:
        raise psycopg.InterfaceError(
            f"search: the connection is {status.name}, not idle or in a transaction"
            " (roll back its failed transaction first)")
    isolation = conn.isolation_level
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    try:
        with conn.transaction():
            yield
    finally:
        conn.isolation_level = isolation


@contextlib.contextmanager
def _search_scope(conn: psycopg.Connection, chosen: Mapping[str, str]) -> Iterator[None]:
    """`_statement_scope` with `chosen` index settings in force for its statements only."""
    if not chosen:
        with _statement_scope(conn):
            yield
        return
    if conn.info.transaction_status == TransactionStatus.INTRANS:
        # The app's transaction: a savepoint rolled back at the end (nothing of ours to
        # keep) takes our SET LOCALs with it; a RELEASE would leave them in force.
        with conn.transaction(force_rollback=True):
            apply_local(conn, chosen)
            yield
        return
    with _statement_scope(conn):
        apply_local(conn, chosen)
        yield


def _statement(slot: Slot, operator: sql.Composable) -> sql.Composed:
    return sql.SQL(_SEARCH).format(
        pk=slot.pk, text=slot.text_expr, vector=slot.vector, op=operator,
        type=sql.SQL(slot.vector_type), table=slot.table)


def _embed_query(settings: Settings, slot: Slot, query: str) -> str:
    """The query's vector as pgvector text: needs no adapter registered on the app's
    connection (and registering one would run a query of its own)."""
    provider = make_provider(settings, slot.provider, slot.model, slot.dimensions, slot.target)
    values = provider.embed([query], input_type=QUERY).vectors[0]
    kind = HalfVector if slot.vector_type == "halfvec" else Vector
    return str(kind(values).to_text())
