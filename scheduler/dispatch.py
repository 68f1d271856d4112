"""One scheduling pass: pending rows -> claimed -> batches on the queue.

The in-flight budget keeps the queue shallow (Postgres, not Redis, holds the
backlog), so a pass enqueues at most `max_inflight_rows` rows per slot and
remembers where it stopped; the next pass continues from there and wraps
around once it reaches the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psycopg
import redis

from pgreembed.chunking.stage import run_chunk_stage
from pgreembed.config import Settings
from pgreembed.queue.broker import make_broker
from pgreembed.queue.claims import InFlight
from pgreembed.queue.contract import ChunkSender, Sender, broker_chunk_sender, broker_sender
from pgreembed.queue.freshness import record_complete_sweep
from pgreembed.store.orphans import OrphanSweep
from pgreembed.store.pending import Cursor, ScanPacer, indexed, sweep
from pgreembed.store.slots import Slot, load_slots
from pgreembed.store.usage import enforce_spend_cap
from scheduler.chunk_dispatch import ChunkDispatch

log = logging.getLogger(__name__)

def dramatiq_sender(settings: Settings) -> Sender:
    """Send batches by the queue contract's names through the broker at settings.redis_url."""
    return broker_sender(make_broker(settings))


def dramatiq_senders(settings: Settings) -> tuple[Sender, ChunkSender]:
    """Both messages' senders (embed batches, chunk batches) through one broker."""
    broker = make_broker(settings)
    return broker_sender(broker), broker_chunk_sender(broker)


@dataclass
class PassReport:
    enqueued_rows: int = 0
    batches: int = 0
    skipped_in_flight: int = 0
    complete: bool = True
    per_target: dict[str, int] = field(default_factory=dict)


class Dispatcher:
    """Finds pending rows of every target and enqueues them, never twice at once."""

    def __init__(self, settings: Settings, redis_client: redis.Redis, send: Sender,
                 page_size: int = 1000, send_chunks: ChunkSender | None = None) -> None:
        """Without `send_chunks` the chunk stage runs here, in the pass (the cronjob's
        `tick`, and callers that run no workers of chunk batches)."""
        self.settings = settings
        self.chunks = None if send_chunks is None else ChunkDispatch(
            settings, redis_client, send_chunks)
        self.redis = redis_client
        self.send = send
        self.page_size = page_size
        self._cursors: dict[int, Cursor] = {}
        self._sweep_started: dict[int, float] = {}  # when each slot's current sweep began
        self.orphans = OrphanSweep(redis_client)
        self._misconfigured_seen: set[int] = set()
        self.pacer = ScanPacer()  # sweeps of a column without its pending index

    def run_pass(self, conn: psycopg.Connection, limit_in_flight: bool = True) -> PassReport:
        """Enqueue pending rows of all targets. Without the limit, sweep everything (tick)."""
        report = PassReport()
        # Chunked targets: dirty parents to the workers (or split here); their new chunks
        # are then pending rows of the chunk table like any other.
        if self.chunks is not None:
            self.chunks.run(conn)
        else:
            run_chunk_stage(conn, self.settings)
        for target in self.settings.targets.values():
            for slot in load_slots(conn, target, include_paused=False):
                conn.commit()  # each page in its own short snapshot
                removed = self.orphans.step(conn, slot)  # bounded, and only when due
                if removed:
                    log.info("slot %d: removed %d state rows of deleted rows", slot.id, removed)
                self._dispatch_slot(conn, slot, limit_in_flight, report)
        conn.commit()
        return report

    def _dispatch_slot(self, conn: psycopg.Connection, slot: Slot, limit_in_flight: bool,
                       report: PassReport) -> None:
        if slot.misconfigured:
            # Every request would fail whatever the rows: wait for the fix and `init`.
            if slot.id not in self._misconfigured_seen and slot.frozen:
                self._misconfigured_seen.add(slot.id)  # adopted from pgai: frozen as meant
                log.warning("slot %d (%s.%s, %s) is frozen: %s", slot.id, slot.target.name,
                            slot.vector_column, slot.model_key, slot.misconfigured)
            elif slot.id not in self._misconfigured_seen:
                self._misconfigured_seen.add(slot.id)
                log.error("slot %d (%s.%s, %s) is misconfigured, not dispatched until"
                          " `pgreembed init` after the fix: %s", slot.id, slot.target.name,
                          slot.vector_column, slot.model_key, slot.misconfigured)
            return
        self._misconfigured_seen.discard(slot.id)
        if slot.mode != "queue" or enforce_spend_cap(conn, slot):
            return  # filled through the Batch API, or paused by its spend cap
        inflight = InFlight(self.redis, slot.id, self.settings.lease_seconds)
        expired = inflight.expire_stale()
        if expired:
            log.warning("slot %d: %d in-flight markers expired; their rows are rescheduled",
                        slot.id, expired)
        budget = (self.settings.max_inflight_rows - inflight.count()) if limit_in_flight else None
        if budget is not None and budget <= 0:
            report.complete = False
            return
        cursor = self._cursors.get(slot.id) if limit_in_flight else None
        # A migration's new column before `migrate index` has no pending index: a sweep
        # walks the table's primary key from the cursor, so the cursor (kept between
        # passes) makes the fill one walk; a new walk from the start is paced.
        walks = limit_in_flight and not indexed(conn, slot)
        if not walks:
            self.pacer.forget(slot.id)
        elif cursor is None and not self.pacer.due(slot.id):
            report.complete = False
            return
        walk_started = time.monotonic()
        if cursor is None:
            self._sweep_started[slot.id] = time.time()
        cursor = cursor or Cursor()
        self._cursors[slot.id] = cursor
        exhausted = True

        # Whole batches per page: pages of 1000 with batches of 512 would send 512 + 488.
        batch = slot.target.batch_size
        whole_page = max(1, round(self.page_size / batch)) * batch

        def page_size() -> int:
            return whole_page if budget is None else max(1, min(whole_page, budget))

        # Claimed keys wait here until they fill a batch: rows that arrive while the sweep
        # runs come as pages of 1-2 keys, which would otherwise each be a message.
        unsent: list[str] = []
        for page in sweep(conn, slot, page_size, cursor):
            keys = [str(k) for k in page]
            claimed = inflight.claim(keys)
            report.skipped_in_flight += len(keys) - len(claimed)
            unsent.extend(claimed)
            whole = len(unsent) - len(unsent) % batch
            self._enqueue(slot, inflight, unsent[:whole], report)
            del unsent[:whole]
            if budget is not None:
                budget -= len(claimed)
                if budget <= 0:
                    exhausted = False
                    report.complete = False
                    break
        self._enqueue(slot, inflight, unsent, report)  # the rest: one partial batch
        if exhausted:
            self._cursors.pop(slot.id, None)  # next pass starts from the beginning
            if walks:
                self.pacer.swept(slot.id, time.monotonic() - walk_started)
            # Every row pending when this sweep began is claimed now (freshness metric).
            record_complete_sweep(self.redis, slot.id, self._sweep_started.pop(slot.id))

    def _enqueue(self, slot: Slot, inflight: InFlight, keys: Sequence[str],
                 report: PassReport) -> None:
        size = slot.target.batch_size
        for start in range(0, len(keys), size):
            chunk = list(keys[start:start + size])
            self.send(slot.target.name, slot.id, chunk, slot.role != "live")
            inflight.confirm(chunk)  # if we die before this, the claims expire in seconds
            report.batches += 1
            report.enqueued_rows += len(chunk)
            report.per_target[slot.target.name] = (
                report.per_target.get(slot.target.name, 0) + len(chunk))
