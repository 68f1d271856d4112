"""A change of `[target.chunking]` as a migration: a new chunk set side by side.

    migrate plan --rechunk  -> parents, chunks now and after, texts to embed, tokens, cost
    migrate start --rechunk -> the new set `<table>__c<slot>` (empty), every parent marked
                               for it; the chunk stage fills it (a text the live set has
                               takes its vector), the workers embed the rest
    migrate index           -> its ANN index, CONCURRENTLY (the ordinary step: its slot)
    migrate swap            -> the two sets exchange names in one short transaction
    migrate rollback        -> the same backwards
    migrate finalize        -> the previous set is dropped; cancel (before a swap) drops
                               the new one

While it is open every parent edit marks both sets (each has its triggers on the parent)
and the stage keeps both current, each with the settings it was made with; the app and
search read the live table (and the views over it, re-created at each swap) and so see
one set at a time. Each step commits its change and its record together.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.config import Settings, Target
from pgreembed.embedding.pricing import list_price
from pgreembed.errors import MigrationError, WaitTimeoutError
from pgreembed.migrations.crash_point import crash_point
from pgreembed.migrations.state import open_migration, require_open
from pgreembed.migrations.swap import index_problems
from pgreembed.store import chunk_settings, rechunk_sets
from pgreembed.store.blockers import ACCESS_EXCLUSIVE, SHARE_ROW_EXCLUSIVE
from pgreembed.store.chunk_triggers import drop_chunk_triggers, install_chunk_triggers
from pgreembed.store.chunks import (
    chunking_key,
    dirty_table,
    ensure_chunk_table,
    parent_key,
    parent_of,
    parent_target,
)
from pgreembed.store.pool import connect
from pgreembed.store.setup import create_state_table, ensure_pending_index
from pgreembed.store.slots import Slot, app_table, load_slots
from pgreembed.store.table_lock import LockPolicy, run_locked
from pgreembed.store.triggers import drop_triggers, install_triggers
from pgreembed.store.versions import INIT_LOCK

log = logging.getLogger(__name__)

DEFAULT_MAX_UNSEARCHABLE = 100  # parents still to chunk + chunks without a vector


def _live(conn: psycopg.Connection, target: Target) -> Slot:
    live = next((s for s in load_slots(conn, target) if s.role == "live"), None)
    if live is None:
        raise MigrationError(f"target {target.name!r} is not initialised: pgreembed init")
    return live


def _require_chunked(target: Target) -> None:
    if target.parent is None:
        raise MigrationError(f"--rechunk: target {target.name!r} has no [target.chunking]")


def start(settings: Settings, target: Target, policy: LockPolicy | None = None) -> Slot:
    """Create the new chunk set with the configured `[target.chunking]` and mark every
    parent for it, with its triggers, slot and migration, in one transaction; run again
    after a crash, it finds its migration and only makes the pending index."""
    _require_chunked(target)
    wanted = parent_of(target).chunking

    def add_set(conn: psycopg.Connection) -> tuple[Slot, bool]:
        conn.execute(INIT_LOCK)
        existing = open_migration(conn, target)
        if existing is not None:
            slot_id = rechunk_sets.rechunk_slot(conn, target)
            made = None if slot_id is None else chunk_settings.recorded(
                conn, dirty_table(rechunk_sets.shadow(target, slot_id)))
            if existing.phase == "filling" and made == wanted:
                return next(s for s in load_slots(conn, target) if s.id == slot_id), False
            raise MigrationError(f"target {target.name!r} already has migration {existing.id}"
                                 f" ({existing.phase}): finish it (`migrate finalize`) or"
                                 " `migrate cancel` it first")
        live = _live(conn, target)
        if live.model_key != target.model_key:
            raise MigrationError(
                f"target {target.name!r}: the config names {target.model_key} but the chunk"
                f" table holds {live.model_key}: a re-chunk keeps the model; change one thing"
                " at a time (run `pgreembed init` for the model first, or restore it)")
        made = chunk_settings.recorded(conn, dirty_table(target))
        if made is None or made == wanted:
            raise MigrationError(
                f"target {target.name!r}: the chunk set was made with the configured"
                " [target.chunking] already: nothing to re-chunk" if made else
                f"target {target.name!r}: the settings its chunk set was made with are not"
                " recorded (run `pgreembed init` once with them)")
        row = conn.execute("SELECT nextval(pg_get_serial_sequence('pgreembed.slots', 'id'))"
                           ).fetchone()
        assert row is not None
        slot_id = int(row[0])
        other = rechunk_sets.shadow(target, slot_id, wanted)
        ensure_chunk_table(conn, other)
        rechunk_sets.copy_grants(conn, app_table(target), app_table(other))
        conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
            dirty_table(other), sql.Literal(chunk_settings.comment(chunking_key(other),
                                                                   wanted))))
        key = parent_key(conn, target)
        marked = conn.execute(sql.SQL(
            "INSERT INTO {dirty} ({marks}) SELECT {key} FROM {parent}").format(
            dirty=dirty_table(other), marks=key.cols(marks=True), key=key.cols(),
            parent=app_table(parent_target(target)))).rowcount
        # Both settings' template columns: after a swap these triggers keep the old set.
        install_chunk_triggers(conn, other, also_watch=made.template_columns)
        conn.execute(
            "INSERT INTO pgreembed.slots (id, target, schema_name, table_name, vector_column,"
            " primary_key, pk_type, role, model_id, mode, vector_type)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, 'next', %s, 'queue', %s)",
            (slot_id, target.name, target.schema, other.table, live.vector_column,
             live.primary_key, live.pk_type, live.model_id, live.vector_type))
        conn.execute(
            "INSERT INTO pgreembed.migrations (target, from_slot, to_slot, phase,"
            " price_per_mtoken) VALUES (%s, %s, %s, 'filling', %s)",
            (target.name, live.id, slot_id,
             list_price(live.provider, live.model, target) or 0.0))
        new_slot = next(s for s in load_slots(conn, target) if s.id == slot_id)
        create_state_table(conn, new_slot)
        log.info("re-chunk of %s started: %d parents to chunk into %s.%s", target.name,
                 marked, other.schema, other.table)
        return new_slot, True

    new_slot, _ = run_locked(settings.database_url, app_table(parent_target(target)),
                             "migrate start --rechunk", add_set, policy,
                             mode=SHARE_ROW_EXCLUSIVE)
    crash_point("start")
    with connect(settings.database_url, autocommit=True) as conn:
        ensure_pending_index(conn, new_slot)
    return new_slot


@dataclass(frozen=True)
class Pair:
    """The live set and the other one of an open re-chunk migration."""

    other: Target  # names the other set's tables
    live: Slot
    incoming: Slot  # the slot on the other set's table


def _pair(conn: psycopg.Connection, target: Target) -> Pair | None:
    slot_id = rechunk_sets.rechunk_slot(conn, target)
    if slot_id is None:
        return None
    other = rechunk_sets.shadow(target, slot_id)
    slots = load_slots(conn, target)
    live = next(s for s in slots if s.role == "live")
    incoming = next(s for s in slots if s.target.table == other.table)
    return Pair(other, live, incoming)


def is_rechunk(settings: Settings, target: Target) -> bool:
    """Whether the target's open migration is a re-chunk (the CLI routes its steps here)."""
    if target.parent is None:
        return False
    with connect(settings.database_url) as conn:
        found = rechunk_sets.rechunk_slot(conn, target) is not None
        conn.rollback()
    return found


@dataclass(frozen=True)
class SwapWait:
    seconds: float
    parents: int
    chunks: int
    allowed: int


@dataclass(frozen=True)
class SwapResult:
    attempts: int
    pause_seconds: float  # ACCESS EXCLUSIVE held: from the lock granted to the commit
    waited_seconds: float
    parents_left: int  # parents not yet chunked again in the new live set at the swap
    chunks_left: int  # its chunks still without a vector
    views: tuple[str, ...] = ()  # views re-created over the new live set
    already_done: bool = False


class _NotReady(Exception):
    """Work arrived between the check and the lock: roll back, wait again."""


def swap(settings: Settings, target: Target, *, rollback: bool = False,
         catch_up_timeout: float = 300.0, max_unsearchable: int = DEFAULT_MAX_UNSEARCHABLE,
         policy: LockPolicy | None = None,
         on_wait: Callable[[SwapWait], None] | None = None) -> SwapResult:
    """Make the other chunk set live: wait (no lock) until at most `max_unsearchable`
    parents still to chunk plus chunks without a vector are left in it, then, under short
    lock attempts, exchange the two sets' names, re-create the views over the chunk table
    and move its triggers, and record the phase, in one transaction."""
    phases = ("swapped",) if rollback else ("filling", "rolled_back")
    step = "rollback" if rollback else "swap"
    done_phase = "rolled_back" if rollback else "swapped"
    with connect(settings.database_url) as conn:
        migration = open_migration(conn, target)
        conn.rollback()
    if migration is not None and migration.phase == done_phase:
        return SwapResult(0, 0.0, 0.0, 0, 0, already_done=True)
    asked = time.monotonic()
    attempts = 0

    def count(attempt: int, _: object) -> None:
        nonlocal attempts
        attempts = attempt

    while True:
        with connect(settings.database_url) as conn:
            require_open(conn, target, *phases)
            pair = _pair(conn, target)
            assert pair is not None
            _, refused = rechunk_sets.dependents(conn, app_table(target))
            rechunk_sets.refuse_dependents(refused, f"{target.schema}.{target.table}", step)
            problems = [] if rollback else index_problems(conn, pair.live, pair.incoming)
            parents, chunks = rechunk_sets.pending_in(conn, pair.other, pair.incoming)
            conn.rollback()
        if problems:
            raise MigrationError("; ".join(problems))
        waited = time.monotonic() - asked
        if parents + chunks > max_unsearchable:
            if waited > catch_up_timeout:
                raise WaitTimeoutError(
                    f"the new chunk set still has {parents} parents to chunk and {chunks}"
                    f" chunks without a vector after {waited:.0f} s (allowed together:"
                    f" {max_unsearchable}): the scheduler and workers are not keeping up"
                    " (`pgreembed status`); try again, or raise --timeout or"
                    " --max-unsearchable")
            if on_wait is not None:
                on_wait(SwapWait(waited, parents, chunks, max_unsearchable))
            time.sleep(0.5)
            continue
        locked_at = 0.0
        left = (0, 0)
        views: list[rechunk_sets.View] = []

        def exchange(conn: psycopg.Connection) -> None:
            nonlocal locked_at, left, views
            migration = require_open(conn, target, *phases, lock=True)
            pair = _pair(conn, target)
            assert pair is not None
            rechunk_sets.lock_sets(conn, target, pair.other)
            locked_at = time.monotonic()
            left = rechunk_sets.pending_in(conn, pair.other, pair.incoming)
            if sum(left) > max_unsearchable:
                raise _NotReady()
            views, refused = rechunk_sets.dependents(conn, app_table(target))
            rechunk_sets.refuse_dependents(refused, f"{target.schema}.{target.table}", step)
            rechunk_sets.exchange(conn, target, pair.other, pair.live, pair.incoming)
            rechunk_sets.recreate_views(conn, views)
            if target.trigger:  # the chunk table's own triggers go with the live name
                drop_triggers(conn, pair.other)
                install_triggers(conn, target, load_slots(conn, target))
            conn.execute("UPDATE pgreembed.migrations SET phase = %s, swapped_at = now()"
                         " WHERE id = %s", (done_phase, migration.id))

        try:
            run_locked(settings.database_url, app_table(target), f"re-chunk {step}", exchange,
                       policy, mode=ACCESS_EXCLUSIVE, on_busy=count)
        except _NotReady:
            continue
        crash_point(step)
        done = time.monotonic()
        return SwapResult(attempts + 1, done - locked_at, done - asked, left[0], left[1],
                          tuple(v.name.as_string(None) for v in views))


@dataclass(frozen=True)
class StepResult:
    already_done: bool = False


def _drop_other(conn: psycopg.Connection, target: Target, phases: tuple[str, ...],
                end_phase: str) -> None:
    migration = require_open(conn, target, *phases, lock=True)
    pair = _pair(conn, target)
    assert pair is not None
    gone = pair.incoming  # the slot on the other set's table: the new one, or the old
    views, refused = rechunk_sets.dependents(conn, app_table(pair.other))
    if views or refused:
        raise MigrationError(
            f"{end_phase} refused, nothing changed:"
            f" {', '.join([v.name.as_string(conn) for v in views] + refused)} read(s)"
            f" {pair.other.schema}.{pair.other.table}, which it would drop")
    drop_chunk_triggers(conn, pair.other)
    conn.execute("UPDATE pgreembed.slots SET role = 'dropped' WHERE id = %s", (gone.id,))
    rechunk_sets.drop_set(conn, pair.other)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(gone.state_table))
    conn.execute("UPDATE pgreembed.migrations SET phase = %s, finished_at = now()"
                 " WHERE id = %s", (end_phase, migration.id))


def _done(settings: Settings, target: Target, phase: str) -> bool:
    with connect(settings.database_url) as conn:
        done = open_migration(conn, target) is None and conn.execute(
            "SELECT phase FROM pgreembed.migrations WHERE target = %s ORDER BY id DESC"
            " LIMIT 1", (target.name,)).fetchone() == (phase,)
        conn.rollback()
    return done


def finalize(settings: Settings, target: Target, policy: LockPolicy | None = None
             ) -> StepResult:
    """After a swap (or a rollback): drop the set that is not live, its triggers on the
    parent, slot and state table."""
    if _done(settings, target, "finalized"):
        return StepResult(already_done=True)
    run_locked(settings.database_url, app_table(parent_target(target)), "re-chunk finalize",
               lambda conn: _drop_other(conn, target, ("swapped", "rolled_back"),
                                        "finalized"), policy, mode=ACCESS_EXCLUSIVE)
    crash_point("finalize")
    return StepResult()


def cancel(settings: Settings, target: Target, policy: LockPolicy | None = None
           ) -> StepResult:
    """Before a swap: drop the new set; the live one is as it was."""
    if _done(settings, target, "cancelled"):
        return StepResult(already_done=True)
    run_locked(settings.database_url, app_table(parent_target(target)), "re-chunk cancel",
               lambda conn: _drop_other(conn, target, ("filling",), "cancelled"), policy,
               mode=ACCESS_EXCLUSIVE)
    crash_point("cancel")
    return StepResult()
