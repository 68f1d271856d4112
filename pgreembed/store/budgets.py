"""Rate budgets recorded in the bookkeeping (`pgreembed.models`): what `migrate start
--requests-per-minute/--tokens-per-minute` set, so every worker on every machine applies
it without a config change (see pgreembed.embedding.budgets, which combines them)."""

from __future__ import annotations

import psycopg

from pgreembed.config import Budget


def recorded_budget(conn: psycopg.Connection, provider: str, model: str) -> Budget:
    """What the bookkeeping says about `model` (of any dimensions)."""
    row = conn.execute(
        "SELECT min(requests_per_minute), min(tokens_per_minute) FROM pgreembed.models"
        " WHERE provider = %s AND name = %s", (provider, model)).fetchone()
    return Budget() if row is None else Budget(row[0], row[1])


def record_budget(conn: psycopg.Connection, model_id: int, budget: Budget) -> None:
    """Remember a budget for a model (the limits given; the others are kept)."""
    conn.execute(
        "UPDATE pgreembed.models SET"
        " requests_per_minute = coalesce(%s, requests_per_minute),"
        " tokens_per_minute = coalesce(%s, tokens_per_minute) WHERE id = %s",
        (budget.requests_per_minute, budget.tokens_per_minute, model_id))
