"""pgvector's query-time index settings: which ones we set, recorded per slot, applied locally.

`pgreembed tune` records, per slot (vector column), the smallest settings that
reached a recall target; `pgreembed.operations.search` applies them to its own statement only,
through `set_config(name, value, true)` (SET LOCAL) inside a transaction or savepoint
that ends with the statement, so they never leak into the app's session. Only the
settings below can be recorded or passed: anything else would let a caller change
arbitrary server settings through us.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import psycopg
from psycopg import sql

# pgvector's query-time settings (iterative scans and their limits need pgvector >= 0.8).
ALLOWED = ("hnsw.ef_search", "hnsw.iterative_scan", "hnsw.max_scan_tuples",
           "ivfflat.probes", "ivfflat.iterative_scan", "ivfflat.max_probes")
ITERATIVE_MODES = ("off", "relaxed_order", "strict_order")


def validate(settings: Mapping[str, object]) -> dict[str, str]:
    """The settings as text, or ValueError naming the setting and what is wrong with it."""
    checked: dict[str, str] = {}
    for name, value in settings.items():
        if name not in ALLOWED:
            raise ValueError(f"index setting {name!r}: not one of {', '.join(ALLOWED)}")
        text = str(value).strip().lower()
        if name.endswith("iterative_scan"):
            if text not in ITERATIVE_MODES:
                raise ValueError(f"index setting {name!r}: must be one of"
                                 f" {', '.join(ITERATIVE_MODES)}, got {value!r}")
        elif isinstance(value, bool) or not text.isdigit() or int(text) <= 0:
            raise ValueError(f"index setting {name!r}: must be a positive integer,"
                             f" got {value!r}")
        checked[name] = text
    return checked


def apply_local(conn: psycopg.Connection, settings: Mapping[str, str]) -> None:
    """SET LOCAL each setting: it lasts until the current transaction or savepoint ends."""
    if settings:
        conn.execute("SELECT set_config(name, value, true)"
                     " FROM unnest(%s::text[], %s::text[]) AS s(name, value)",
                     (list(settings), list(settings.values())), prepare=False)


def set_statements(conn: psycopg.Connection, settings: Mapping[str, str], *,
                   local: bool = False) -> list[str]:
    """`SET name = 'value';` per setting, quoted by this connection (safe to paste)."""
    command = sql.SQL("SET LOCAL" if local else "SET")
    return [sql.SQL("{} {} = {};").format(command, sql.Identifier(*name.split(".")),
                                          sql.Literal(value)).as_string(conn)
            for name, value in settings.items()]


def recorded(conn: psycopg.Connection, slot_id: int) -> dict[str, str]:
    """The settings `tune` recorded for the slot ({} if none, or before `init` made the
    table): two catalog-cheap statements, no lock beyond ACCESS SHARE on our table."""
    exists = conn.execute("SELECT to_regclass('pgreembed.index_settings') IS NOT NULL",
                          prepare=False).fetchone()
    if not exists or not exists[0]:
        return {}
    row = conn.execute("SELECT settings FROM pgreembed.index_settings WHERE slot_id = %s",
                       (slot_id,), prepare=False).fetchone()
    if row is None:
        return {}
    return validate(row[0] if isinstance(row[0], dict) else json.loads(row[0]))


def record(conn: psycopg.Connection, slot_id: int, settings: Mapping[str, str], *,
           index_name: str, k: int, target_recall: float, recall: float,
           filter_sql: str | None) -> None:
    """Replace the slot's recommendation (the caller commits)."""
    conn.execute(
        """
        INSERT INTO pgreembed.index_settings (slot_id, settings, index_name, k, target_recall,
                                              recall, filter)
        VALUES (%s, %s::jsonb, %s, %s, %s, %s, %s)
        ON CONFLICT (slot_id) DO UPDATE SET settings = excluded.settings,
            index_name = excluded.index_name, k = excluded.k,
            target_recall = excluded.target_recall, recall = excluded.recall,
            filter = excluded.filter, measured_at = now()
        """, (slot_id, json.dumps(dict(validate(settings))), index_name, k, target_recall,
              recall, filter_sql))
