"""`import-pgai --take-over` and `--undo`: hand a pgai vectorizer's work to pgreembed and back.

Take-over, in steps that are each safe to stop after (a second run finishes the job):
  1. our triggers on the source, created disabled (no effect yet);
  2. the vectorizer disabled with pgai's own `ai.disable_vectorizer_schedule` (its worker
     checks the flag before every batch), then a wait for its batch in flight to commit
     (pgai's trigger still queues every write meanwhile);
  3. the cut-over, one round trip under the table-lock policy (100 ms lock attempts with
     jittered retries, blockers named; SHARE ROW EXCLUSIVE on the source: the app's reads
     go on, its writes wait the milliseconds it takes): pgai's two triggers disabled (kept,
     for an undo) and ours enabled in one ALTER TABLE, so every write is seen by exactly
     one side; the keys in pgai's queue marked dirty for our chunk stage and their rows
     deleted; rows a pgai batch still holds skipped (never waited on) and their keys kept
     in the registry, marked once that batch is over; a pause an undo made lifted;
  4. pgai's failed-queue keys recorded as failures of their parents with pgai's reason (a
     key queued again since it failed is chunked instead).
If the cut-over cannot get its lock, the vectorizer is enabled again: pgai stays in charge.
Undo is the same backwards: our triggers disabled and pgai's enabled, every parent with
work left (dirty, or a chunk without a vector) queued for pgai, the vectorizer enabled,
our live column paused (the scheduler sends nothing of it while pgai is in charge).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pgreembed.config import Settings, Target
from pgreembed.errors import (
    ConfigError,
    NotInitializedError,
    SetupError,
)
from pgreembed.operations.pgai_control import (
    live_slot,
    refuse_foreign,
    require_taken,
    set_disabled,
    wait_for_pgai,
)
from pgreembed.store import pgai_queue, takeover
from pgreembed.store.blockers import ACCESS_EXCLUSIVE, SHARE_ROW_EXCLUSIVE
from pgreembed.store.chunk_adopt import vector_not_null
from pgreembed.store.chunk_sets import dirty_exists
from pgreembed.store.chunk_triggers import (
    chunk_trigger_names,
    chunk_triggers_current,
    chunk_triggers_present,
    install_chunk_triggers,
    set_chunk_triggers_enabled,
)
from pgreembed.store.chunks import parent_key, parent_target
from pgreembed.store.parent_keys import ParentKey
from pgreembed.store.pgai_cutover import Switched, switch_to_pgreembed
from pgreembed.store.pgai_queue import key_of
from pgreembed.store.pgai_values import Vectorizer
from pgreembed.store.pool import connect
from pgreembed.store.slots import Slot, app_table, load_slots
from pgreembed.store.table_lock import LockPolicy, run_locked

log = logging.getLogger(__name__)

IN_FLIGHT_WAIT_SECONDS = 120.0  # how long a take-over waits for pgai's batch in flight


@dataclass
class TakeoverReport:
    vectorizer: str
    target: str
    state: str  # "taken", "already taken", "undone"
    queued_rows: int = 0  # rows in pgai's queue at the take-over (a key may repeat)
    keys_marked: int = 0  # parents marked for the chunk stage (or handed back to pgai)
    keys_gone: int = 0  # queued keys whose row was deleted meanwhile: nothing to do
    in_flight: int = 0  # keys a pgai batch was writing at the take-over
    in_flight_left: int = 0  # ... still held when the wait ran out (marked all the same)
    failed_recorded: int = 0
    failed_superseded: int = 0  # failed in pgai, queued again since: chunked instead
    waited_for_pgai_s: float = 0.0  # for pgai's batch in flight, after disabling it
    lock_attempts: int = 0
    locked_ms: float = 0.0  # the transaction holding the source's lock
    locked_at: float = 0.0  # when it began (epoch seconds)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_of(settings: Settings, vec: Vectorizer) -> Target:
    """The chunked target that adopted `vec`'s chunk table (from the config, or the one
    import-pgai maps it to)."""
    if vec.destination_kind != "table" or vec.chunk_table is None:
        raise SetupError(f"pgai vectorizer {vec.name!r} writes a column of"
                         f" {vec.source_schema}.{vec.source_table}: no chunk table")
    found = [t for t in settings.targets.values()
             if t.parent is not None and (t.schema, t.table) == vec.chunk_table
             and (t.parent.schema, t.parent.table) == (vec.source_schema, vec.source_table)]
    if len(found) > 1:  # the config's and the mapped one: the one import-pgai registered
        with connect(settings.database_url) as conn:
            found = [t for t in found if any(s.role == "live" for s in load_slots(conn, t))]
            conn.commit()
    if len(found) == 1:
        return found[0]
    if not found:
        raise ConfigError(f"no target adopts pgai vectorizer {vec.name!r}"
                          f" ({vec.source_schema}.{vec.source_table} ->"
                          f" {'.'.join(vec.chunk_table)}): run `pgreembed import-pgai"
                          f" --vectorizer {vec.name}` (adopt) first")
    raise ConfigError(f"targets {', '.join(t.name for t in found)} all adopt pgai vectorizer"
                      f" {vec.name!r}: keep one in the config")


def take_over(settings: Settings, vec: Vectorizer, policy: LockPolicy | None = None,
              in_flight_wait: float = IN_FLIGHT_WAIT_SECONDS) -> TakeoverReport:
    started = time.monotonic()
    if vec.destination_kind == "column":
        from pgreembed.operations.pgai_column_takeover import take_over_column

        report = TakeoverReport(vec.name, "", "taken")
        take_over_column(settings, vec, policy, in_flight_wait, report)
        report.seconds = round(time.monotonic() - started, 3)
        return report
    target = target_of(settings, vec)
    refuse_foreign(vec.name, target)
    dsn = settings.database_url
    report = TakeoverReport(vec.name, target.name, "taken")
    with connect(dsn) as conn:
        live = live_slot(load_slots(conn, target), target)
        if vector_not_null(conn, target):
            raise SetupError(f"target {target.name!r}: {target.schema}.{target.table}."
                             f"{target.vector_column} is still NOT NULL as pgai made it:"
                             " import (adopt) the vectorizer before --take-over")
        key = parent_key(conn, target)
        if key.columns != key_of(vec).columns:
            raise SetupError(f"pgai vectorizer {vec.name!r} keys rows by"
                             f" ({key_of(vec).name}), target {target.name!r} by ({key.name})")
        if not dirty_exists(conn, target):  # made by adopt (init_chunking)
            raise NotInitializedError(f"target {target.name!r} has no dirty table yet: run"
                                      " `pgreembed import-pgai` (adopt) before --take-over")
        takeover.ensure_tables(conn, target, key)
        previous = takeover.read_takeover(conn, target)
        current = chunk_triggers_current(conn, target)
        present = bool(chunk_triggers_present(conn, target))
        conn.commit()
    if previous is not None and previous.state == "taken" and vec.disabled:
        report.state = "already taken"
    else:
        _prepare(dsn, target, current, present, policy)
        set_disabled(dsn, vec, True)
        try:
            report.waited_for_pgai_s = wait_for_pgai(dsn, vec, in_flight_wait)
            queued = _cut_over(dsn, target, vec, live, policy, report)
        except BaseException:
            if not vec.disabled:  # pgai stays in charge, as it was
                set_disabled(dsn, vec, False)
            raise
        _record_failures(dsn, target, vec, key, queued, report)
    _finish_in_flight(dsn, target, vec, key, in_flight_wait, report)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _prepare(dsn: str, target: Target, current: bool, present: bool,
             policy: LockPolicy | None) -> None:
    """Our triggers on the source, created disabled (no effect yet), so the cut-over is one
    ALTER TABLE that switches both sides."""
    if current:
        return

    def work(conn: Any) -> None:
        install_chunk_triggers(conn, target)
        set_chunk_triggers_enabled(conn, target, False)

    run_locked(dsn, app_table(parent_target(target)), "take over (pgreembed's triggers)",
               work, policy, mode=ACCESS_EXCLUSIVE if present else SHARE_ROW_EXCLUSIVE)


def _cut_over(dsn: str, target: Target, vec: Vectorizer, live: Slot,
              policy: LockPolicy | None, report: TakeoverReport) -> list[str]:
    """The switch, in one short transaction; returns the keys queued at it (as text)."""
    held: dict[str, float] = {}
    result: list[Switched] = []
    with connect(dsn) as conn:
        pgai_triggers = list(pgai_queue.triggers_enabled(conn, vec))
        conn.commit()

    def work(conn: Any) -> None:
        report.lock_attempts += 1
        held["from"] = time.monotonic()
        report.locked_at = time.time()
        result[:] = [switch_to_pgreembed(conn, target, vec, pgai_triggers,
                                         chunk_trigger_names(target), live)]

    run_locked(dsn, app_table(parent_target(target)),
               f"take over pgai vectorizer {vec.name}", work, policy,
               mode=SHARE_ROW_EXCLUSIVE)
    report.locked_ms = round(1000 * (time.monotonic() - held["from"]), 1)  # commit included
    (switched,) = result
    report.queued_rows = switched.deleted + switched.held
    report.keys_marked, report.keys_gone = switched.marked, switched.gone
    report.in_flight = len(switched.in_flight)
    log.info("target %s: took over pgai vectorizer %s: %d queued keys marked, %d in a pgai"
             " batch in flight; source locked %.0f ms", target.name, vec.name,
             report.keys_marked, report.in_flight, report.locked_ms)
    return switched.queued


def _record_failures(dsn: str, target: Target, vec: Vectorizer, key: ParentKey,
                     queued: list[str], report: TakeoverReport) -> None:
    """pgai's failures recorded as the parents' (a key queued again since it failed is
    chunked instead); outside the lock: pgai writes no failure once disabled."""
    with connect(dsn) as conn:
        failed = pgai_queue.failures(conn, vec)
        again = set(queued)
        kept = [(f.key, f.failed_at, f.reason) for f in failed if str(f.key) not in again]
        report.failed_superseded = len(failed) - len(kept)
        report.failed_recorded = takeover.record_failures(conn, target, key, kept)
        conn.commit()


def _finish_in_flight(dsn: str, target: Target, vec: Vectorizer, key: ParentKey,
                      wait: float, report: TakeoverReport) -> None:
    """Wait for pgai's batch in flight at the take-over to end (its commit deletes its
    queue rows; a rollback leaves them, and they are moved like the others), then mark its
    keys: the chunk stage compares what it wrote with the current text."""
    deadline = time.monotonic() + wait
    while True:
        with connect(dsn) as conn:
            taken = pgai_queue.take_queue(conn, vec)
            marked, gone = takeover.mark_dirty(conn, target, key, taken.moved)
            report.keys_marked += marked
            report.keys_gone += gone
            conn.commit()
        if taken.held == 0 or time.monotonic() >= deadline:
            break
        time.sleep(0.2)  # pgai's batch is at its provider: poll, never wait on its locks
    report.in_flight_left = taken.held
    if taken.held:
        report.notes.append(f"{taken.held} queue rows still held by a pgai batch after"
                            f" {wait:.0f} s: their keys are marked all the same")
    with connect(dsn) as conn:
        found = takeover.read_takeover(conn, target)
        keys = found.in_flight if found is not None else []
        marked, gone = takeover.mark_dirty(conn, target, key, keys)
        report.keys_marked += marked
        report.keys_gone += gone
        takeover.clear_in_flight(conn, target)
        takeover.notify(conn, target)
        conn.commit()


def undo(settings: Settings, vec: Vectorizer, policy: LockPolicy | None = None
         ) -> TakeoverReport:
    started = time.monotonic()
    if vec.destination_kind == "column":
        from pgreembed.operations.pgai_column_takeover import undo_column

        report = TakeoverReport(vec.name, "", "undone")
        undo_column(settings, vec, policy, report)
        report.seconds = round(time.monotonic() - started, 3)
        return report
    target = target_of(settings, vec)
    dsn = settings.database_url
    report = TakeoverReport(vec.name, target.name, "undone")
    with connect(dsn) as conn:
        live = live_slot(load_slots(conn, target), target)
        key = parent_key(conn, target)
        found = takeover.read_takeover(conn, target)
        conn.commit()
    found = require_taken(found, target, vec.name)
    held: dict[str, float] = {}
    in_flight = found.in_flight

    def work(conn: Any) -> None:
        report.lock_attempts += 1
        held["from"] = time.monotonic()
        report.locked_at = time.time()
        pgai_queue.switch_triggers(conn, vec, chunk_triggers_present(conn, target), False)
        texts = {*takeover.take_dirty(conn, target, key),
                 *takeover.parents_with_pending_chunks(conn, target, key, live.vector),
                 *in_flight}
        report.keys_marked = pgai_queue.hand_back(conn, vec, sorted(texts))
        report.queued_rows = report.keys_marked
        pgai_queue.set_disabled(conn, vec, False)
        takeover.pause_live(conn, live, True)
        takeover.record_undone(conn, target)

    run_locked(dsn, app_table(parent_target(target)), f"hand pgai vectorizer {vec.name} back",
               work, policy, mode=SHARE_ROW_EXCLUSIVE)
    report.locked_ms = round(1000 * (time.monotonic() - held["from"]), 1)
    report.seconds = round(time.monotonic() - started, 3)
    log.info("target %s: handed pgai vectorizer %s back: %d keys queued for pgai",
             target.name, vec.name, report.keys_marked)
    return report


def vectorizers(settings: Settings, names: list[str] | None) -> list[Vectorizer]:
    """The catalog's vectorizers asked for (import-pgai's refusals of old catalogs apply)."""
    from pgreembed.operations.pgai_import import read_catalog

    with connect(settings.database_url, vector=False) as conn:
        found = read_catalog(conn, names)
        conn.commit()
    return found
