"""`migrate status`: how far a migration's new column is filled, at what rate and spend.

Cheap at any table size (it also runs inside `pgreembed status`): the counts are the
status counts (pgreembed.store.counts: the row estimate, the partial indexes, a sample of
pages while more than 50,000 rows are left), and the rate is the usage ledger's rows of
the last minute (its (slot, at) index), not a scan of the state table.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgreembed.config import Settings, Target
from pgreembed.migrations.index import ColumnIndex, column_indexes
from pgreembed.migrations.state import Migration, require_open, slots_by_id
from pgreembed.store.catalog import estimated_rows, regclass
from pgreembed.store.counts import cheap_counts, exact_counts
from pgreembed.store.pool import connect
from pgreembed.store.usage import spend


@dataclass(frozen=True)
class Progress:
    migration: Migration
    column: str
    model: str
    total: int
    done: int
    failed: int
    rate_per_second: float
    eta_seconds: float | None
    paused: bool
    indexes: list[ColumnIndex]
    tokens: int
    spend_usd: float
    spend_cap_usd: float | None
    paused_by: str | None = None  # "operator" or "spend_cap"
    estimated: bool = False  # total and done from the row estimate (and a sample of pages)


def progress(settings: Settings, target: Target) -> Progress:
    with connect(settings.database_url) as conn:
        migration = require_open(conn, target)
        slots = slots_by_id(conn, target)
        slot = slots.get(migration.to_slot) or slots[migration.from_slot]
        if slot.role == "live":  # after a swap, report on the column being kept for rollback
            slot = slots[migration.from_slot]
        estimate = estimated_rows(conn, regclass(conn, slot.table))
        if estimate is None:  # a table never analysed: small, or new
            total, done, _, _, _, failed, _ = exact_counts(conn, slot)
        else:
            found = cheap_counts(conn, slot, estimate)
            total = max(estimate, found.without_vector + found.outdated)
            done, failed = total - found.without_vector, found.failed
        # Rows written in the last minute, from the ledger (one row per batch; a derived
        # fill, which buys nothing, shows its own progress in `migrate start`).
        recent_row = conn.execute(
            "SELECT coalesce(sum(inputs + reused), 0) FROM pgreembed.usage"
            " WHERE slot_id = %s AND at > now() - interval '60 seconds'", (slot.id,)).fetchone()
        recent = int(recent_row[0]) if recent_row else 0
        indexes = column_indexes(conn, slot)
        tokens, spent, cap = spend(conn, migration.to_slot)
        paused_by = conn.execute("SELECT paused_by FROM pgreembed.slots WHERE id = %s AND"
                                 " paused", (slot.id,)).fetchone()
    rate = recent / 60.0
    left = max(0, total - done - failed)
    # A paused fill does not finish: no ETA (its recent rate would promise one).
    eta = None if slot.paused and left else (
        (left / rate) if rate > 0 else (0.0 if left == 0 else None))
    return Progress(migration, slot.vector_column, slot.model_key, total, done, failed, rate,
                    eta, slot.paused, indexes, tokens, spent, cap,
                    paused_by[0] if paused_by else None, estimate is not None)
