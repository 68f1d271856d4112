"""Random rows of a big table without scanning it: one policy for doctor's checks,
`doctor --verify`, recall measurements and the migration quality gate.

A table over BLOCK_SAMPLE_FACTOR times the sample is read through TABLESAMPLE SYSTEM:
about OVERSAMPLE times the sample's share of its pages, widened 4x per attempt while
too few rows match, up to the whole table. SYSTEM samples whole pages, so rows written
together are sampled together.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import psycopg
from psycopg import sql

from pgreembed.store import catalog

BLOCK_SAMPLE_FACTOR = 20
OVERSAMPLE = 5
WIDEN = 4

T = TypeVar("T")


def first_percent(conn: psycopg.Connection, table: sql.Identifier, size: int) -> float:
    """The share of `table`'s pages to read first for `size` rows (100: all of them)."""
    estimate = catalog.row_estimate(conn, catalog.regclass(conn, table))
    if estimate > BLOCK_SAMPLE_FACTOR * size:
        return min(100.0, 100.0 * OVERSAMPLE * size / estimate)
    return 100.0


def tablesample(percent: float) -> sql.Composable:
    """The FROM item's sampling clause for `percent` of the pages (none at 100)."""
    if percent >= 100.0:
        return sql.SQL("")
    return sql.SQL("TABLESAMPLE SYSTEM ({})").format(sql.Literal(percent))


def widening(conn: psycopg.Connection, table: sql.Identifier, size: int,
             fetch: Callable[[float], list[T]]) -> list[T]:
    """`fetch(percent)` from `first_percent` on, widened while it returns fewer than
    `size` rows; its last answer (at 100 percent: whatever the table holds)."""
    percent = first_percent(conn, table, size)
    while True:
        rows = fetch(percent)
        if len(rows) >= size or percent >= 100.0:
            return rows
        percent = min(100.0, percent * WIDEN)
