"""One pass for a cronjob: enqueue everything pending, optionally wait until it is done.

Exit codes: 0 done; 1 a service failed; 3 --wait timed out with work left; 4 a target is
not initialised (raised as NotInitializedError, mapped by the CLI), or a column is
misconfigured (the provider rejects every input or answers the wrong dimensions): its
rows stay pending until the config is fixed and `pgreembed init` clears the mark. The
other columns are still done first. A column adopted from pgai with a provider pgreembed
lacks (Slot.frozen) is frozen as meant: named, not an exit 4.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import redis

from pgreembed.config import Settings
from pgreembed.errors import EXIT_MISCONFIGURED, EXIT_OK, EXIT_TIMEOUT, PgreembedError
from pgreembed.migrations.side_fill import advance
from pgreembed.queue.claims import InFlight
from pgreembed.queue.contract import Sender
from pgreembed.store.pool import connect
from pgreembed.store.slots import Slot, load_slots, require_initialized
from scheduler.dispatch import Dispatcher, dramatiq_sender

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TickProgress:
    """While --wait waits: rows enqueued by every pass so far, and how many are done."""

    enqueued: int
    done: int
    passes: int


def _in_flight(settings: Settings, client: redis.Redis, slot_ids: list[int]) -> int:
    total = 0
    for slot_id in slot_ids:
        marker = InFlight(client, slot_id, settings.lease_seconds)
        marker.expire_stale()
        total += marker.count()
    return total


def _finish(settings: Settings, conn: psycopg.Connection) -> int:
    """EXIT_OK, or EXIT_MISCONFIGURED naming each misconfigured column and why."""
    marked: list[Slot] = [s for t in settings.targets.values() for s in load_slots(conn, t)
                          if s.misconfigured]
    conn.commit()
    bad = [s for s in marked if not s.frozen]
    for slot in marked:
        if slot.frozen:  # adopted from pgai, never embedded with: as meant
            print(f"tick: target {slot.target.name} column {slot.vector_column}"
                  f" ({slot.model_key}) is frozen: {slot.misconfigured}", file=sys.stderr,
                  flush=True)
    for slot in bad:
        print(f"tick: target {slot.target.name} column {slot.vector_column}"
              f" ({slot.model_key}) is misconfigured, nothing is sent for it:"
              f" {slot.misconfigured}; fix the config, then run `pgreembed init`",
              file=sys.stderr, flush=True)
    return EXIT_MISCONFIGURED if bad else EXIT_OK


def _advance_side_fills(settings: Settings) -> bool:
    """Each target's side fill one step further (started, copied, indexed, swapped,
    finalized); True if one moved. Cron-only deployments have no scheduler to do it."""
    moved = False
    for target in settings.targets.values():
        try:
            moved = advance(settings, target) is not None or moved
        except (psycopg.Error, PgreembedError) as exc:
            log.warning("side fill of %s: %s: %s", target.name, type(exc).__name__, exc)
    return moved


def run_tick(settings: Settings, wait: bool = False, timeout: float = 600.0,
             send: Sender | None = None,
             on_progress: Callable[[TickProgress], None] | None = None) -> int:
    """One pass (with `wait`: passes until nothing is pending or in flight); `on_progress`
    is called every 0.2 s while waiting."""
    client = redis.Redis.from_url(settings.redis_url)
    dispatcher = Dispatcher(settings, client, send or dramatiq_sender(settings))
    deadline = time.monotonic() + timeout
    with connect(settings.database_url) as conn:
        require_initialized(conn, settings.targets.values())
        conn.commit()
        enqueued = passes = 0
        while True:
            moved = _advance_side_fills(settings)
            report = dispatcher.run_pass(conn, limit_in_flight=False)
            passes += 1
            enqueued += report.enqueued_rows + report.skipped_in_flight
            print(f"tick: enqueued {report.enqueued_rows} rows in {report.batches} batches"
                  f" ({report.skipped_in_flight} already in flight)", flush=True)
            if not wait:
                return _finish(settings, conn)
            # Wait for the workers, then sweep again: rows whose text changed while in
            # flight are pending again and must be done before we call it finished.
            slot_ids = [s.id for t in settings.targets.values() for s in load_slots(conn, t)]
            conn.commit()  # a side fill adds and removes columns between passes
            waiting_for = _in_flight(settings, client, slot_ids)
            while (left := _in_flight(settings, client, slot_ids)) > 0:
                if on_progress is not None:
                    on_progress(TickProgress(enqueued, max(enqueued - left, 0), passes))
                if time.monotonic() > deadline:
                    stuck = ("; none landed while it waited: are the workers running,"
                             " and may they write? (`pgreembed doctor` checks the role's"
                             " rights and the provider; the workers' log has the error)"
                             if left >= waiting_for else "")
                    print(f"tick: timed out with {left} rows still in flight{stuck}",
                          flush=True)
                    return EXIT_TIMEOUT
                time.sleep(0.2)
            if on_progress is not None:
                on_progress(TickProgress(enqueued, enqueued, passes))
            if report.enqueued_rows == 0 and report.skipped_in_flight == 0 and not moved:
                return _finish(settings, conn)
