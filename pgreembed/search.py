"""The app-side helper: embed a query with the target's *active* model and search.

The model and column are read from the registry on every call, so a swap
(`pgreembed migrate swap`) is picked up without a restart, and the
connection never prepares plans (which break when a swap changes a column type).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from pgvector import HalfVector
from psycopg import sql

from pgreembed.config import Settings
from pgreembed.providers import make_provider
from pgreembed.slots import Slot, load_slots

# pgvector distance operators by metric.
OPERATORS = {"cosine": "<=>", "l2": "<->", "inner_product": "<#>"}


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
    raise LookupError(f"target {target_name!r} has no live column: run `pgreembed init`")


def search(conn: psycopg.Connection, settings: Settings, target_name: str, query: str,
           limit: int = 5, metric: str = "cosine") -> list[Hit]:
    """Nearest rows to `query`, never failing across a concurrent swap.

    The query is embedded with the live model read optimistically; then, inside a
    transaction holding ACCESS SHARE on the table (a swap needs ACCESS EXCLUSIVE,
    so none can commit meanwhile), the live model is read again and the query
    re-embedded in the rare case a swap happened in between.
    """
    slot = live_slot(conn, settings, target_name)
    vector = _embed_query(settings, slot, query)
    with conn.transaction():
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(slot.table))
        current = live_slot(conn, settings, target_name)
        if current.model_key != slot.model_key:
            slot, vector = current, _embed_query(settings, current, query)
        rows = conn.execute(sql.SQL(
            "SELECT {pk}, ({text})::text, {vec} {op} %s AS distance FROM {table}"
            " WHERE {vec} IS NOT NULL ORDER BY {vec} {op} %s LIMIT %s"
        ).format(pk=slot.pk, text=slot.text_expr, vec=slot.vector,
                 op=sql.SQL(OPERATORS[metric]), table=slot.table),
            (vector, vector, limit), prepare=False).fetchall()
    return [Hit(r[0], r[1], float(r[2])) for r in rows]


def _embed_query(settings: Settings, slot: Slot, query: str) -> Any:
    provider = make_provider(settings, slot.provider, slot.model, slot.dimensions)
    vector = np.asarray(provider.embed([query]).vectors[0], dtype=np.float32)
    return HalfVector(vector) if slot.vector_type == "halfvec" else vector
