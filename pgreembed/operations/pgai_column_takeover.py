"""`import-pgai --take-over` / `--undo` of a column destination (`ai.destination_column`).

The adoption made the vector column an ordinary target: our triggers are on the source
(an edit of the text sets the vector NULL, as pgreembed's triggers always do), and the
live column is paused (`paused_by = 'pgai'`) while pgai's worker is in charge, so the
scheduler sends nothing of it and no text is bought twice. The take-over:
  1. the vectorizer disabled with pgai's own function, then a wait for its batch in flight;
  2. one short transaction under the table-lock policy (SHARE ROW EXCLUSIVE on the source:
     reads go on, writes wait): pgai's triggers disabled (kept, for the undo), its free
     queue rows deleted and their rows made pending (vector NULL, key order, SKIP LOCKED:
     a row an app transaction holds is never waited on, its key is kept in the registry
     and done right after), the pause lifted, the scheduler woken;
  3. pgai's failed keys recorded as failed on their current text, with pgai's reason.
The undo: pgai's triggers enabled, every row with a NULL vector queued for pgai, the
vectorizer enabled, the live column paused again.
"""

from __future__ import annotations

import time
from typing import Any

from pgreembed.config import Settings, Target
from pgreembed.errors import ConfigError, NotInitializedError
from pgreembed.operations.pgai_control import (
    live_slot,
    refuse_foreign,
    require_taken,
    set_disabled,
    wait_for_pgai,
)
from pgreembed.store import pgai_column, pgai_queue, takeover
from pgreembed.store.blockers import SHARE_ROW_EXCLUSIVE
from pgreembed.store.pgai_values import Vectorizer
from pgreembed.store.pool import connect
from pgreembed.store.slots import Slot, app_table, load_slots
from pgreembed.store.table_lock import LockPolicy, run_locked
from pgreembed.store.triggers import triggers_current


def column_target_of(settings: Settings, vec: Vectorizer) -> Target:
    """The ordinary target on the vectorizer's source and embedding column."""
    column = str(vec.section("destination").get("embedding_column"))
    found = [t for t in settings.targets.values()
             if t.parent is None and (t.schema, t.table, t.vector_column)
             == (vec.source_schema, vec.source_table, column)]
    if len(found) != 1:
        raise ConfigError(f"{'no target' if not found else 'several targets'} on"
                          f" {vec.source_schema}.{vec.source_table}.{column} for pgai"
                          f" vectorizer {vec.name!r}: run `pgreembed import-pgai --vectorizer"
                          f" {vec.name} --adopt` first, and keep one target in the config")
    return found[0]


def _live(conn: Any, target: Target) -> Slot:
    slots = load_slots(conn, target)
    live = live_slot(slots, target)
    if not triggers_current(conn, target, slots):
        raise NotInitializedError(f"target {target.name!r}: pgreembed's triggers on"
                                  f" {target.schema}.{target.table} are missing or out of"
                                  " date: run `pgreembed init` before --take-over")
    return live


def take_over_column(settings: Settings, vec: Vectorizer, policy: LockPolicy | None,
                     in_flight_wait: float, report: Any) -> None:
    """Fills `report` (an operations.pgai_takeover.TakeoverReport)."""
    target = column_target_of(settings, vec)
    refuse_foreign(vec.name, target)
    report.target = target.name
    dsn = settings.database_url
    with connect(dsn) as conn:
        live = _live(conn, target)
        takeover.ensure_registry(conn)
        previous = takeover.read_takeover(conn, target)
        conn.commit()
    if previous is not None and previous.state == "taken" and vec.disabled:
        report.state = "already taken"
    else:
        set_disabled(dsn, vec, True)
        try:
            report.waited_for_pgai_s = wait_for_pgai(dsn, vec, in_flight_wait)
            _cut_over(dsn, target, vec, live, policy, report)
        except BaseException:
            if not vec.disabled:  # pgai stays in charge, as it was
                set_disabled(dsn, vec, False)
            raise
    _finish_left(dsn, target, vec, live, in_flight_wait, report)


def _cut_over(dsn: str, target: Target, vec: Vectorizer, live: Slot,
              policy: LockPolicy | None, report: Any) -> None:
    held: dict[str, float] = {}
    result: list[pgai_column.ColumnSwitched] = []
    with connect(dsn) as conn:  # pgai writes no failure once disabled and its batch over
        pgai_triggers = list(pgai_queue.triggers_enabled(conn, vec))
        failed = [(f.key, f.failed_at, f.reason) for f in pgai_queue.failures(conn, vec)]
        conn.commit()

    def work(conn: Any) -> None:
        report.lock_attempts += 1
        held["from"] = time.monotonic()
        report.locked_at = time.time()
        result[:] = [pgai_column.switch_column(conn, vec, live, target.name, pgai_triggers,
                                               [], failed)]

    run_locked(dsn, app_table(target), f"take over pgai vectorizer {vec.name}", work, policy,
               mode=SHARE_ROW_EXCLUSIVE)
    report.locked_ms = round(1000 * (time.monotonic() - held["from"]), 1)
    (switched,) = result
    report.queued_rows = switched.deleted + switched.held
    report.keys_marked = len(switched.pending)
    report.in_flight = switched.held
    report.failed_recorded = switched.failed_recorded
    report.failed_superseded = switched.failed_superseded


def _finish_left(dsn: str, target: Target, vec: Vectorizer, live: Slot, wait: float,
                 report: Any) -> None:
    """The keys the cut-over left (rows an app transaction held, or a pgai batch in flight
    had claimed): made pending once free, polling (never waiting on a lock)."""
    deadline = time.monotonic() + wait
    while True:
        with connect(dsn) as conn:
            found = takeover.read_takeover(conn, target)
            left = found.in_flight if found is not None else []
            if pgai_queue.held_rows(conn, vec) == 0:  # pgai's batch is over
                taken = pgai_queue.take_queue(conn, vec)
                left = sorted({*left, *(str(k) for k in taken.moved)})
                done = pgai_column.make_pending(conn, live, left)
                report.keys_marked += len(done)
                left = [k for k in left if k not in set(done)]
                pgai_column.keep_left(conn, target.name, left)
                takeover.notify(conn, target)
            conn.commit()
        if not left or time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    report.in_flight_left = len(left)
    if left:
        report.notes.append(f"{len(left)} rows still held after {wait:.0f} s: kept in"
                            " pgreembed.pgai_takeovers, made pending by the next --take-over")


def undo_column(settings: Settings, vec: Vectorizer, policy: LockPolicy | None,
                report: Any) -> None:
    target = column_target_of(settings, vec)
    report.target = target.name
    dsn = settings.database_url
    with connect(dsn) as conn:
        live = _live(conn, target)
        found = takeover.read_takeover(conn, target)
        conn.commit()
    found = require_taken(found, target, vec.name)
    held: dict[str, float] = {}

    def work(conn: Any) -> None:
        report.lock_attempts += 1
        held["from"] = time.monotonic()
        report.locked_at = time.time()
        pgai_queue.switch_triggers(conn, vec, [], False)
        keys = sorted({*pgai_column.pending_keys(conn, live), *found.in_flight})
        report.keys_marked = report.queued_rows = pgai_queue.hand_back(conn, vec, keys)
        pgai_queue.set_disabled(conn, vec, False)
        takeover.pause_live(conn, live, True)
        takeover.record_undone(conn, target)

    run_locked(dsn, app_table(target), f"hand pgai vectorizer {vec.name} back", work, policy,
               mode=SHARE_ROW_EXCLUSIVE)
    report.locked_ms = round(1000 * (time.monotonic() - held["from"]), 1)
