"""Side fills: a big backlog of an indexed live column goes through a side column.

Writing into a column with an HNSW index is ~90x slower than into one without
(docs/architecture.md), so past a measured crossover (`[side_fill]`,
bench/side_fill_crossover.py) a backlog is a migration to the SAME model that pgreembed
starts and finishes by itself, through the ordinary migration lifecycle:

    start (lifecycle.start, auto_reason 'backlog'; the live column is paused)
    copying   the vectors already paid for are copied into the side column
    filling   the scheduler and workers fill it like any migration's new column
    indexing  CREATE INDEX CONCURRENTLY (migrations.index), sized to the machine
    swapping  migrations.swap: waits as the runbook says, one short transaction
    swapped   the previous column is kept `grace_seconds` for a rollback, then finalized.

A model change that `init` finds (route_model_change) is the same machine with
auto_reason 'model_change', starting at 'filling': search keeps the old model until the
swap and never mixes the two. The scheduler calls `advance` for every target.

Crash safety: each step's change and its record commit together (the copy's unpause and
'filling'; the swap records 'swapped' in its own transaction), the phase has the last
word over the recorded step (a swapped migration is never swapped again), and the other
steps are idempotent (an index already built is kept, one left INVALID is rebuilt).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

import psycopg

from pgreembed.config import Settings, Target
from pgreembed.errors import MigrationError
from pgreembed.migrations import app_objects
from pgreembed.migrations.crash_point import crash_point
from pgreembed.migrations.index import build_index, column_indexes
from pgreembed.migrations.lifecycle import BACKLOG, SIDE_FILL, cancel, finalize, start
from pgreembed.migrations.plan import Plan, plan
from pgreembed.migrations.state import slots_by_id
from pgreembed.migrations.swap import DEFAULT_MAX_UNSEARCHABLE, swap
from pgreembed.store.backlog import backlog_at_least, build_settings, copy_page
from pgreembed.store.catalog import estimated_rows, regclass
from pgreembed.store.pending import ScanPacer, indexed
from pgreembed.store.pool import connect
from pgreembed.store.slots import Slot, load_slots, new_column_type, registry_exists
from pgreembed.store.versions import current_version, upgrade

log = logging.getLogger(__name__)

MODEL_CHANGE = "model_change"
COPY_PAGE_ROWS = 5000
COPY_BUSY_RETRIES = 3  # a page's rows the app holds are tried again, then left to the queue
SIDE_FILL_VERSION = 2  # the bookkeeping version that records side fills


@dataclass(frozen=True)
class SideFill:
    """A side fill in progress: why, where it is, and the column being filled."""

    migration_id: int
    reason: str
    step: str
    phase: str
    from_slot: int
    to_slot: int
    column: str
    swapped_at: datetime | None


def current(conn: psycopg.Connection, target: Target) -> SideFill | None:
    if current_version(conn) < SIDE_FILL_VERSION:
        return None  # not upgraded by `init` yet: no side fill can exist
    row = conn.execute(
        "SELECT m.id, m.auto_reason, m.auto_step, m.phase, m.from_slot, m.to_slot,"
        " s.vector_column, m.swapped_at FROM pgreembed.migrations m"
        " JOIN pgreembed.slots s ON s.id = m.to_slot WHERE m.target = %s"
        " AND m.phase IN ('filling', 'swapped', 'rolled_back') AND m.auto_reason IS NOT NULL",
        (target.name,)).fetchone()
    return None if row is None else SideFill(*row)


def _set_step(conn: psycopg.Connection, fill: SideFill, step: str) -> None:
    conn.execute("UPDATE pgreembed.migrations SET auto_step = %s WHERE id = %s",
                 (step, fill.migration_id))
    log.info("side fill %d (%s, column %s): %s", fill.migration_id, fill.reason, fill.column,
             step)


def finish_rows(settings: Settings) -> int:
    """Pending rows of the side column at which its index is built: what is left then is a
    small inflow, which the direct path handles."""
    return max(DEFAULT_MAX_UNSEARCHABLE, settings.side_fill.min_rows // 10)


def backlog_threshold(conn: psycopg.Connection, settings: Settings, live: Slot) -> int:
    return settings.side_fill.threshold(estimated_rows(conn, regclass(conn, live.table)) or 0)


def should_start(conn: psycopg.Connection, settings: Settings, live: Slot) -> int | None:
    """The live column's backlog when it should go side by side (indexed, over the
    threshold), else None."""
    if live.misconfigured or live.mode != "queue" or live.paused:
        return None
    if not any(i.valid and i.distance for i in column_indexes(conn, live)):
        return None  # no ANN index: writing directly is already the fast path
    threshold = backlog_threshold(conn, settings, live)
    backlog = backlog_at_least(conn, live, threshold + 1)
    return backlog if backlog > threshold else None


# Until `migrate index`, the side column has no pending index (its fill's updates can then
# be HOT): counting what is left walks the table, so the count is paced like the sweeps.
_count_walks = ScanPacer()
_told: dict[str, str] = {}  # per target: the last refusal logged (logged once, not per poll)


def swap_refusals(conn: psycopg.Connection, live: Slot, to_type: str,
                  columns: list[str] | None = None) -> list[str]:
    """Why a swap of `live` to a `to_type` column would be refused (app objects it cannot
    keep on the column), one line each; empty when it would go through. A side fill ends in
    a swap: one that will be refused must not start (it pauses the live column until then)."""
    found = app_objects.swap_decisions(conn, live.table, columns or [live.vector_column],
                                       live.column_type, to_type)
    return [d.line() for d in found if d.action == app_objects.REFUSE]


def _tell_once(target: Target, refusals: list[str], message: str) -> None:
    said = "\n".join(refusals)
    if _told.get(target.name) != said:
        _told[target.name] = said
        log.warning("%s", message)


def advance(settings: Settings, target: Target) -> str | None:
    """Take the target's side fill one step further (or start one); what was done."""
    if not settings.side_fill.enabled:
        return None
    with connect(settings.database_url, autocommit=True) as conn:
        fill = current(conn, target)
        if fill is None:
            live = next((s for s in load_slots(conn, target) if s.role == "live"), None)
            if live is None or current_version(conn) < SIDE_FILL_VERSION:
                return None
            backlog = should_start(conn, settings, live)
            if backlog is None or _open_migration(conn, target):
                return None
            refusals = swap_refusals(conn, live, live.column_type)
            conn.rollback()
            if refusals:
                _tell_once(target, refusals, f"target {target.name}: {backlog}+ rows pending in the"
                           f" indexed column {live.vector_column}, filled directly: a side"
                           " fill's swap would be refused:" + "".join(
                               f"\n  - {line}" for line in refusals))
                return None
            log.info("target %s: %s rows pending in the indexed column %s: filling a side"
                     " column", target.name, f"{backlog}+", live.vector_column)
            start(settings, target, live.provider, live.model, live.dimensions,
                  auto_reason=BACKLOG)
            return "started"
        if fill.phase == "swapped":  # whatever step was recorded: the swap committed
            return _maybe_finalize(conn, settings, target, fill)
        if fill.phase != "filling":
            return None  # rolled back by an operator: theirs to swap or finalize
        if fill.step == "copying":
            return _copy(conn, target, fill)
        if fill.step == "filling":
            return _maybe_index(conn, settings, target, fill)
        if fill.step in ("indexing", "swapping"):
            return _swap(conn, settings, target, fill)
    return None


def _open_migration(conn: psycopg.Connection, target: Target) -> bool:
    return conn.execute("SELECT 1 FROM pgreembed.migrations WHERE target = %s AND phase IN"
                        " ('filling', 'swapped', 'rolled_back')", (target.name,)
                        ).fetchone() is not None


def _copy(conn: psycopg.Connection, target: Target, fill: SideFill) -> str:
    """Vectors of the live model already paid for go into the side column (no second
    purchase), then the side column is let to fill."""
    slots = slots_by_id(conn, target)
    source, side = slots[fill.from_slot], slots[fill.to_slot]
    after, copied = None, 0
    while True:
        start = after
        after, count, busy = copy_page(conn, source, side, start, COPY_PAGE_ROWS)
        for attempt in range(1, COPY_BUSY_RETRIES + 1):
            if not busy:
                break  # else rows the app holds now: try them again once it let them go
            time.sleep(0.1 * attempt)
            after, more, busy = copy_page(conn, source, side, start, COPY_PAGE_ROWS)
            count += more
        copied += count
        if after is None:
            break
    with conn.transaction():  # the change and its record commit together
        conn.execute("UPDATE pgreembed.slots SET paused = false, paused_by = NULL"
                     " WHERE id = %s AND paused_by = %s", (side.id, SIDE_FILL))
        _set_step(conn, fill, "filling")
    log.info("side fill %d: %d vectors copied into %s", fill.migration_id, copied,
             side.vector_column)
    crash_point("copy")
    return "copied"


def _maybe_index(conn: psycopg.Connection, settings: Settings, target: Target,
                 fill: SideFill) -> str | None:
    side = slots_by_id(conn, target)[fill.to_slot]
    limit = finish_rows(settings)
    walks = not indexed(conn, side)  # no pending index yet: the count walks the table
    if walks and not _count_walks.due(side.id):
        return None
    started = time.monotonic()
    left = backlog_at_least(conn, side, limit + 1)
    if walks:
        _count_walks.swept(side.id, time.monotonic() - started)
    if left > limit:
        return None
    _set_step(conn, fill, "indexing")
    rows = estimated_rows(conn, regclass(conn, side.table)) or 0
    memory, workers = build_settings(conn, rows, side.dimensions,
                                     settings.side_fill.maintenance_work_mem,
                                     settings.side_fill.parallel_workers)
    log.info("side fill %d: CREATE INDEX CONCURRENTLY on %s (~%d rows, maintenance_work_mem"
             " %s, %d parallel workers)", fill.migration_id, side.vector_column, rows, memory,
             workers)
    build_index(settings, target, maintenance_work_mem=memory, parallel_workers=workers)
    _set_step(conn, fill, "swapping")
    return "indexed"


def _swap(conn: psycopg.Connection, settings: Settings, target: Target,
          fill: SideFill) -> str | None:
    if fill.step == "indexing":  # a build interrupted (crash): build_index resumes it
        return _maybe_index(conn, settings, target, fill)
    slots = slots_by_id(conn, target)
    live, side = slots[fill.from_slot], slots[fill.to_slot]
    refusals = swap_refusals(conn, live, side.column_type,
                             [live.vector_column, side.vector_column])
    conn.rollback()
    if refusals:  # an app object that appeared since the start: its swap would never go
        log.warning("side fill %d (%s) cancelled, the live column %s is filled directly"
                    " again: its swap would be refused:%s", fill.migration_id, fill.reason,
                    live.vector_column, "".join(f"\n  - {line}" for line in refusals))
        try:
            cancel(settings, target)  # drops the side column, unpauses the live one
        except MigrationError as exc:  # e.g. an app object reads the side column
            log.warning("side fill %d: not cancelled yet: %s", fill.migration_id, exc)
            return None
        return "cancelled"
    try:
        result = swap(settings, target, catch_up_timeout=10.0)
    except MigrationError as exc:
        log.warning("side fill %d: not swapped yet: %s", fill.migration_id, exc)
        return None
    log.info("side fill %d: swapped in %d attempt(s), table locked %.3f s, %d rows left to"
             " embed", fill.migration_id, result.attempts, result.pause_seconds,
             result.unsearchable)  # the swap recorded the step 'swapped' in its commit
    return "swapped"


def _maybe_finalize(conn: psycopg.Connection, settings: Settings, target: Target,
                    fill: SideFill) -> str | None:
    if fill.swapped_at is None:
        return None
    row = conn.execute("SELECT now() - %s > make_interval(secs => %s)",
                       (fill.swapped_at, settings.side_fill.grace_seconds)).fetchone()
    if not row or not row[0]:
        return None
    finalize(settings, target)
    log.info("side fill %d finished: the previous column is dropped", fill.migration_id)
    return "finalized"


def model_change(conn: psycopg.Connection, target: Target) -> Slot | None:
    """The live slot when the config names another model of the same size than the
    live one (and it is not a config left behind by a migration), else None."""
    live = next((s for s in load_slots(conn, target) if s.role == "live"), None)
    if live is None or live.model_key == target.model_key or (
            live.dimensions != target.dimensions) or _open_migration(conn, target):
        return None
    left_behind = conn.execute(
        "SELECT mo.key FROM pgreembed.migrations m JOIN pgreembed.slots f ON f.id = m.from_slot"
        " JOIN pgreembed.models mo ON mo.id = f.model_id WHERE m.target = %s AND m.phase IN"
        " ('swapped', 'finalized') ORDER BY m.id DESC LIMIT 1", (target.name,)).fetchone()
    return None if left_behind and left_behind[0] == target.model_key else live


def route_model_change(settings: Settings, target: Target) -> tuple[Slot, Plan] | None:
    """At `init`: a same-size model change of a table over `min_rows` rows (or of one that
    was migrated before, where `init` never changes the model in place) becomes a side
    fill to the new model instead of an in-place re-embed that would leave search mixing
    both models for hours. Returns the new column's slot and the plan (cost) it was
    started with; None when the change (if any) stays in place."""
    with connect(settings.database_url) as conn:
        if not registry_exists(conn):
            return None
        upgrade(conn, repeatable=False)  # side fills need version 2
        conn.commit()
        live = model_change(conn, target)
        if live is None:
            return None
        rows = estimated_rows(conn, regclass(conn, live.table)) or 0
        migrated = conn.execute("SELECT count(*) FROM pgreembed.migrations WHERE target = %s",
                                (target.name,)).fetchone()
        cancelled = _cancelled_before(conn, target)
        conn.rollback()
        # The column type the config asks for, else a chosen halfvec live column's (a
        # derived halfvec column stays halfvec through a model change, even before the
        # config says so): store.slots.new_column_type, as `migrate start`.
        kind = new_column_type(target, live, target.dimensions)
        refusals = swap_refusals(conn, live, f"{kind}({target.dimensions})")
        conn.rollback()
    if rows <= settings.side_fill.min_rows and not (migrated and migrated[0]):
        return None
    if refusals:
        log.warning("target %s: the model change is not filled side by side: its swap would"
                    " be refused:%s", target.name, "".join(f"\n  - {line}" for line in refusals))
        return None
    if cancelled is not None:  # each start would buy the whole table's vectors again
        log.warning("target %s: side fill %d to %s was cancelled (by pgreembed at its swap,"
                    " the log says why, or by `migrate cancel`); `init` does not start it"
                    " again: fix that, then `pgreembed"
                    " migrate start --target %s --provider %s --model %s --dimensions %d`,"
                    " or set the config back to %s", target.name, cancelled, target.model_key,
                    target.name, target.provider, target.model, target.dimensions,
                    live.model_key)
        return None
    estimate = plan(settings, target, target.provider, target.model, target.dimensions)
    # The type the refusals were checked with: the swap must not change it unchecked.
    slot = start(settings, target, target.provider, target.model, target.dimensions,
                 auto_reason=MODEL_CHANGE, vector_type=kind)
    return slot, estimate


def _cancelled_before(conn: psycopg.Connection, target: Target) -> int | None:
    """The id of the target's latest migration if it was a side fill to the config's
    model that pgreembed cancelled (its swap would have been refused), else None."""
    row = conn.execute(
        "SELECT m.id, m.auto_reason = %s AND m.phase = 'cancelled' AND mo.key = %s"
        " FROM pgreembed.migrations m JOIN pgreembed.slots s ON s.id = m.to_slot"
        " JOIN pgreembed.models mo ON mo.id = s.model_id WHERE m.target = %s"
        " ORDER BY m.id DESC LIMIT 1", (MODEL_CHANGE, target.model_key, target.name)
    ).fetchone()
    return int(row[0]) if row and row[1] else None
