"""One batch, end to end: load the rows still pending, embed them, write them back.

This is what a worker actor runs; `pgreembed tick --inline` runs it in-process.
The provider is called outside any transaction, so no row lock or snapshot is
held while waiting on the network.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from psycopg import sql

from pgreembed import spend
from pgreembed.config import Settings
from pgreembed.db import get_pool
from pgreembed.embedding import Outcome, embed_rows
from pgreembed.metrics import failure_kind, worker_metrics
from pgreembed.providers import make_provider
from pgreembed.slots import NOTIFY_CHANNEL, Slot
from pgreembed.store import (
    load_pending,
    lock_slot,
    record_failures,
    record_usage,
    write_vectors,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchReport:
    requested: int
    pending: int
    written: int
    failed: int
    changed_meanwhile: int


def process_batch(settings: Settings, target_name: str, slot_id: int,
                  keys: Sequence[str], claimed_at: Mapping[str, float] | None = None
                  ) -> BatchReport:
    """`claimed_at`: when the scheduler claimed each key (epoch seconds), for the lag
    metric."""
    target = settings.target(target_name)
    pool = get_pool(settings.database_url, settings.pool_max_size)
    with pool.connection() as conn:
        found = lock_slot(conn, target, slot_id, "ACCESS SHARE")
        # A paused migration stops spending now: queued batches are dropped, their rows
        # stay pending and are dispatched again on resume.
        if found is None or found.paused:
            return BatchReport(len(keys), 0, 0, 0, 0)
        slot = found
        rows = load_pending(conn, slot, keys)
    if not rows:
        return BatchReport(len(keys), 0, 0, 0, 0)

    provider = make_provider(settings, slot.provider, slot.model, slot.dimensions)
    reservation = spend.reserve(pool, slot, provider, rows)  # the batch's share of a spend cap
    if not reservation.granted:  # the cap is reached (paused) or held by batches in flight
        return BatchReport(len(keys), len(rows), 0, 0, 0)
    with reservation.released_on_error():
        outcome = embed_rows(rows, provider, truncate=target.truncate)
    embedded, failed = outcome.embedded, outcome.failed
    for failure in failed:
        log.warning("target %s row %s not embedded: %s", target.name, failure.row.pk,
                    failure.reason)

    with pool.connection() as conn:
        # The vectors belong to the slot's model, not to a column name: a swap or rollback
        # may have renamed the columns while we waited on the provider (invariant 7).
        current = lock_slot(conn, target, slot_id, "ROW EXCLUSIVE")
        if current is None:  # its column was dropped meanwhile (cancel, finalize)
            record_usage(conn, slot, len(embedded), outcome.tokens)
            reservation.settle(conn)
            return BatchReport(len(keys), len(rows), 0, 0, 0)
        slot = current
        written = write_vectors(conn, slot, embedded)
        record_failures(conn, slot, failed)
        changed = len(embedded) - len(written)
        record_usage(conn, slot, len(embedded), outcome.tokens)
        reservation.settle(conn)  # in the same transaction as the billed tokens
        if changed:
            # Their text changed while we embedded: wake the scheduler to redo them now.
            conn.execute(sql.SQL("SELECT pg_notify({}, {})").format(
                sql.Literal(NOTIFY_CHANNEL), sql.Literal(target.name)))
    report = BatchReport(len(keys), len(rows), len(written), len(failed), changed)
    _count(slot, report, outcome)
    _observe_lag(slot, written, claimed_at)
    log.info("target %s slot %d: %d written, %d failed, %d changed meanwhile (of %d)",
             target.name, slot.id, report.written, report.failed, changed, len(keys))
    return report


def _count(slot: Slot, report: BatchReport, outcome: Outcome) -> None:
    metrics = worker_metrics()
    if metrics is None:
        return
    from pgreembed.migrate import PRICES_PER_MTOKEN

    name = slot.target.name
    tokens = outcome.tokens
    price = PRICES_PER_MTOKEN.get(slot.model, 0.0) if slot.provider == "openai" else 0.0
    metrics.rows.labels(name, slot.vector_column).inc(report.written)
    metrics.tokens.labels(name, slot.model_key).inc(tokens)
    metrics.cost.labels(name, slot.model_key).inc(tokens / 1e6 * price)
    metrics.changed.labels(name).inc(report.changed_meanwhile)
    for failure in outcome.failed:
        metrics.failures.labels(name, failure_kind(failure.reason)).inc()


def _observe_lag(slot: Slot, written: Sequence[object],
                 claimed_at: Mapping[str, float] | None) -> None:
    """Claim-to-committed lag of each row written (see pgreembed.freshness)."""
    metrics = worker_metrics()
    if metrics is None or not claimed_at:
        return
    now = time.time()
    histogram = metrics.lag.labels(slot.target.name, slot.vector_column)
    for key in written:
        claimed = claimed_at.get(str(key))
        if claimed is not None:
            histogram.observe(max(0.0, now - claimed))
