"""`doctor --recall`: one column's index measured at the settings the search helper applies.

Those are the settings `pgreembed tune` recorded for the column, else the server's
own. The target is the one `tune` was given, unless the caller names one, else 0.95.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from pgreembed.operations.recall import (
    DEFAULT_EXACT_TIMEOUT_MS,
    AnnIndex,
    Measurement,
    stored_vector_truth,
)
from pgreembed.store import index_settings
from pgreembed.store.slots import Slot

DEFAULT_TARGET = 0.95


@dataclass(frozen=True)
class SlotRecall:
    column: str
    role: str
    model: str
    index: AnnIndex
    settings: dict[str, str]  # what search applies ({}: the server's settings)
    target_recall: float
    k: int
    measurement: Measurement

    def as_dict(self) -> dict[str, Any]:
        return {"column": self.column, "role": self.role, "model": self.model,
                "index": self.index.as_dict(), "settings": self.settings,
                "target_recall": self.target_recall, "k": self.k,
                **{key: value for key, value in self.measurement.as_dict().items()
                   if key in ("recall", "p50_ms", "p99_ms", "queries", "short")}}


def recorded_target(conn: psycopg.Connection, slot_id: int) -> float | None:
    exists = conn.execute("SELECT to_regclass('pgreembed.index_settings') IS NOT NULL"
                          ).fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute("SELECT target_recall FROM pgreembed.index_settings WHERE slot_id = %s",
                       (slot_id,)).fetchone()
    return None if row is None else float(row[0])


def measure_slot(conn: psycopg.Connection, slot: Slot, queries: int, k: int,
                 target_recall: float | None = None,
                 exact_timeout_ms: int = DEFAULT_EXACT_TIMEOUT_MS) -> SlotRecall | None:
    """The slot's index recall@k at search's settings; None without an ANN index or rows."""
    index, truth = stored_vector_truth(conn, slot, queries, k,
                                       exact_timeout_ms=exact_timeout_ms)
    if index is None or truth is None:
        return None
    settings = index_settings.recorded(conn, slot.id)
    target = target_recall or recorded_target(conn, slot.id) or DEFAULT_TARGET
    measured, _ = truth.ann(settings)
    return SlotRecall(slot.vector_column, slot.role, slot.model_key, index, settings, target,
                      k, measured)
