"""Re-embedding migrations: start, pause, resume, cancel, finalize.

    plan -> start (new column, filled by the normal scheduler/workers alongside traffic)
         -> index (CREATE INDEX CONCURRENTLY) -> swap (one short transaction)
         -> rollback (the same swap backwards) | finalize (drop the previous column)
    cancel (before a swap) drops the new column and leaves the table as it was.

All state lives in Postgres (`pgreembed.migrations`, `pgreembed.slots`): every step can
be re-run after a crash.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import psycopg
from psycopg import sql

from pgreembed.config import Budget, Settings, Target
from pgreembed.embedding.pricing import list_price
from pgreembed.errors import ConfigError, MigrationError
from pgreembed.migrations import app_objects, clear
from pgreembed.migrations.app_objects import refuse_drop
from pgreembed.migrations.crash_point import crash_point
from pgreembed.migrations.index import column_indexes
from pgreembed.migrations.state import (
    CANCELLING,
    FINALIZING,
    new_column_name,
    open_migration,
    refuse_if_clearing,
    require_open,
    slots_by_id,
)
from pgreembed.store.blockers import ACCESS_EXCLUSIVE
from pgreembed.store.budgets import record_budget
from pgreembed.store.pool import connect
from pgreembed.store.setup import (
    create_state_table,
    ensure_model,
    ensure_pending_index,
    ensure_vector_column,
    pending_index_at_setup,
)
from pgreembed.store.slots import Slot, app_table, load_slots, new_column_type
from pgreembed.store.table_lock import LockPolicy, run_locked
from pgreembed.store.triggers import install_triggers
from pgreembed.store.usage import SPEND_CAP, spend
from pgreembed.store.versions import INIT_LOCK

log = logging.getLogger(__name__)

BACKLOG = "backlog"  # auto_reason of a side fill of the live model
SIDE_FILL = "side_fill"  # paused_by of the columns a side fill holds back


def start(settings: Settings, target: Target, provider: str, model: str,
          dimensions: int, spend_cap_usd: float | None = None, batch_api: bool = False,
          budget: Budget | None = None, policy: LockPolicy | None = None,
          auto_reason: str | None = None, derive: str | None = None,
          vector_type: str | None = None) -> Slot:
    """Add the new column and register it; the scheduler starts filling it at once.

    `auto_reason` marks a side fill that pgreembed itself started and finishes
    (migrations.side_fill): 'model_change', or 'backlog', a column of the live model
    whose filling waits (paused) until the vectors already paid for are copied into it,
    while the live column is paused so the backlog is not written into its index.

    With a spend cap, the migration pauses once the tokens sent for the new column
    cost that much (at the model's list price). A budget is recorded for the new
    model, where every worker reads it (re-running start with another one updates it).
    `derive`: the new column is filled in SQL from the live one (pgreembed.migrations.derive);
    the scheduler leaves it alone ("derive" mode) until that fill is done.
    `vector_type`: the new column's storage (default: `store.slots.new_column_type`; a
    backlog side fill keeps the live column's); the same model in another storage is a
    migration too."""
    if provider == "local" and dimensions != 384:
        raise ConfigError("--dimensions: the local model produces 384 dimensions")
    budget = budget or Budget()
    if budget and provider == "local":
        raise ConfigError("--requests-per-minute/--tokens-per-minute apply to remote"
                          " providers only (not local)")
    new_target = replace(target, provider=provider, model=model, dimensions=dimensions)
    if batch_api and provider != "openai":
        raise ConfigError("--batch-api needs the openai provider")

    def add_column(conn: psycopg.Connection) -> tuple[Slot, bool]:
        conn.execute(INIT_LOCK)
        existing = open_migration(conn, target)
        if existing is not None:
            slot = slots_by_id(conn, target).get(existing.to_slot)
            if existing.phase == "filling" and slot and slot.model_key == new_target.model_key \
                    and (vector_type is None or slot.vector_type == vector_type):
                record_budget(conn, slot.model_id, budget)
                return slot, False  # re-run after a crash: idempotent
            then = ("`migrate cancel` it, or swap and finalize it" if existing.phase == "filling"
                    else "`migrate finalize` it (or roll it back first, then finalize)")
            raise MigrationError(f"target {target.name!r} already has migration {existing.id}"
                                 f" ({existing.phase}): {then}")
        live = next((s for s in load_slots(conn, target) if s.role == "live"), None)
        if live is None:
            raise MigrationError(f"target {target.name!r} is not initialised: pgreembed init")
        kind = vector_type or (live.vector_type if auto_reason == BACKLOG
                               else new_column_type(target, live, dimensions))
        if (live.model_key, live.vector_type) == (new_target.model_key, kind) and (
                auto_reason != BACKLOG):
            raise MigrationError(f"target {target.name!r} already uses {live.model_key}"
                                 f" in a {live.column_type} column (the same model in"
                                 " another storage: `migrate start --derive halfvec` casts"
                                 " it to halfvec in SQL, at no cost; set the target's"
                                 " vector_type to re-embed it into another type)")
        model_id = ensure_model(conn, new_target)
        record_budget(conn, model_id, budget)
        column = new_column_name(target, model_id)
        row = conn.execute(
            """
            INSERT INTO pgreembed.slots (target, schema_name, table_name, vector_column,
                                         primary_key, pk_type, role, model_id, mode, paused,
                                         paused_by, vector_type)
            VALUES (%s, %s, %s, %s, %s, %s, 'next', %s, %s, %s, %s, %s) RETURNING id
            """, (target.name, target.schema, target.table, column, live.primary_key,
                  live.pk_type, model_id,
                  "derive" if derive else "batch" if batch_api else "queue",
                  auto_reason == BACKLOG, SIDE_FILL if auto_reason == BACKLOG else None,
                  kind)
        ).fetchone()
        assert row is not None
        price = list_price(provider, model, target) or 0.0
        if batch_api:
            price /= 2  # the Batch API bills half
        if spend_cap_usd is not None and not price:
            raise MigrationError(f"no list price known for {model!r}: a spend cap cannot be"
                                 " enforced")
        conn.execute(
            "INSERT INTO pgreembed.migrations (target, from_slot, to_slot, phase,"
            " spend_cap_usd, price_per_mtoken, auto_reason, auto_step, derived)"
            " VALUES (%s, %s, %s, 'filling', %s, %s, %s, %s, %s)",
            (target.name, live.id, row[0], spend_cap_usd, price, auto_reason,
             None if auto_reason is None else "copying" if auto_reason == BACKLOG
             else "filling", f"{derive} of {live.model_key}" if derive else None))
        if auto_reason == BACKLOG:
            conn.execute("UPDATE pgreembed.slots SET paused = true, paused_by = %s"
                         " WHERE id = %s", (SIDE_FILL, live.id))
        slots = load_slots(conn, target)
        new_slot = next(s for s in slots if s.id == row[0])
        create_state_table(conn, new_slot)
        # The app's table is locked from here to the commit (ADD COLUMN, then the
        # triggers): everything that does not need it came first.
        ensure_vector_column(conn, target, column, dimensions, kind)
        if target.trigger:
            install_triggers(conn, target, slots)
        return new_slot, True

    new_slot, created = run_locked(settings.database_url, app_table(target), "migrate start",
                                   add_column, policy, mode=ACCESS_EXCLUSIVE)
    crash_point("start")
    _finish_start(settings, target)
    if created:
        log.info("migration of %s to %s started: column %s", target.name, new_slot.model_key,
                 new_slot.vector_column)
    return new_slot


def app_objects_report(settings: Settings, target: Target
                       ) -> tuple[list[app_objects.Decision], list[str]]:
    """The app's objects reading the target's columns, with what the swap will do."""
    with connect(settings.database_url, autocommit=True) as conn:
        return app_objects.report(conn, target)


def _finish_start(settings: Settings, target: Target) -> None:
    """The slots' pending indexes. The new column's only when the live column has no ANN
    index: then no fill update files a vector in a graph (little for HOT to save), and a
    swap without `migrate index` would otherwise build it while writes are in flight."""
    with connect(settings.database_url, autocommit=True) as conn:
        slots = load_slots(conn, target)
        live = next(s for s in slots if s.role == "live")
        ann = any(i.valid and i.distance for i in column_indexes(conn, live))
        for slot in slots:
            if pending_index_at_setup(slot) or not ann:  # else `migrate index` makes it
                ensure_pending_index(conn, slot)


def pause(settings: Settings, target: Target) -> None:
    """Stop filling (queued batches are dropped); a pause by the spend cap stays one.

    The phase is read under the migration row's lock, which a swap takes before it makes
    the new column live (and unpaused): a pause never lands on a column that is live."""
    with connect(settings.database_url) as conn:
        migration = require_open(conn, target, "filling", lock=True)
        conn.execute("UPDATE pgreembed.slots SET paused = true,"
                     " paused_by = CASE WHEN paused THEN paused_by ELSE 'operator' END"
                     " WHERE id = %s AND role = 'next'", (migration.to_slot,))
        conn.commit()


class KeepCap:
    """`resume` without --spend-cap: the cap stays as it is."""


KEEP_CAP = KeepCap()


def resume(settings: Settings, target: Target,
           spend_cap_usd: float | None | KeepCap = KEEP_CAP) -> None:
    """Fill again. A migration its spend cap paused resumes only with a raised cap
    (`spend_cap_usd`) or none (None): with the same cap it would pause again at once."""
    with connect(settings.database_url) as conn:
        migration = require_open(conn, target, "filling")
        row = conn.execute(
            "SELECT s.paused_by FROM pgreembed.migrations m JOIN pgreembed.slots s"
            " ON s.id = m.to_slot WHERE m.id = %s FOR UPDATE OF m, s",
            (migration.id,)).fetchone()
        assert row is not None
        refuse_if_clearing(conn, slots_by_id(conn, target)[migration.to_slot], "resume")
        _, spent, cap = spend(conn, migration.to_slot)
        where = f"migration {migration.id} of {target.name!r}"
        if isinstance(spend_cap_usd, float):
            price = conn.execute("SELECT price_per_mtoken FROM pgreembed.migrations"
                                 " WHERE id = %s", (migration.id,)).fetchone()
            if not price or not price[0]:
                raise MigrationError(f"{where}: no list price known for its model: a spend"
                                     " cap cannot be enforced")
            if spend_cap_usd <= spent:
                raise MigrationError(f"{where}: --spend-cap {spend_cap_usd:g} is not above the"
                                     f" ${spent:.6f} already spent; give a higher cap")
        if not isinstance(spend_cap_usd, KeepCap):
            conn.execute("UPDATE pgreembed.migrations SET spend_cap_usd = %s WHERE id = %s",
                         (spend_cap_usd, migration.id))
        elif row[0] == SPEND_CAP and cap is not None:
            raise MigrationError(
                f"{where} was paused by its spend cap: ${spent:.6f} spent of ${cap:.6f}."
                f" Raise the cap to resume (pgreembed migrate resume --target {target.name}"
                " --spend-cap USD), or remove it (--spend-cap none)")
        conn.execute("UPDATE pgreembed.slots SET paused = false, paused_by = NULL"
                     " WHERE id = %s", (migration.to_slot,))
        conn.commit()


def _drop_slot(conn: psycopg.Connection, target: Target, slot: Slot) -> None:
    """Remove a slot's column, indexes (they go with the column) and state table."""
    conn.execute("UPDATE pgreembed.slots SET role = 'dropped' WHERE id = %s", (slot.id,))
    remaining = load_slots(conn, target)
    if target.trigger:
        install_triggers(conn, target, remaining)  # before the column it names is gone
    conn.execute(sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(
        slot.table, slot.vector))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(slot.state_table))


@dataclass(frozen=True)
class StepResult:
    """What a cancel or finalize did: `already_done` when it was run again after its
    commit (a crash before the caller heard of it) and had nothing left to do."""

    already_done: bool = False


def _already_done(settings: Settings, target: Target, done_phase: str) -> bool:
    """No open migration, and the last one ended in `done_phase` (this step committed)."""
    with connect(settings.database_url) as conn:
        done = open_migration(conn, target) is None and _last_phase(conn, target) == done_phase
        conn.rollback()
    return done


def cancel(settings: Settings, target: Target, policy: LockPolicy | None = None,
           clear_vectors: bool = True) -> StepResult:
    """Before a swap: drop the new column; the live column is untouched. Run again after
    its commit, it has nothing to do.

    First (`clear_vectors`) the new column's vectors leave the disk, as finalize does for
    the replaced one (migrations.clear): the slot is marked CANCELLING (no swap, resume or
    index build from here), its indexes dropped, its rows set to NULL in short
    transactions; an interrupted cancel resumes there. Then DROP COLUMN."""
    if _already_done(settings, target, "cancelled"):
        return StepResult(already_done=True)
    policy = policy or LockPolicy()

    def begin(conn: psycopg.Connection) -> Slot:
        migration = require_open(conn, target, "filling", lock=True)
        new = slots_by_id(conn, target)[migration.to_slot]
        refuse_drop(conn, new.table, new.vector_column, "cancel")  # before anything goes
        conn.execute("UPDATE pgreembed.slots SET paused = true, paused_by = %s"
                     " WHERE id = %s", (CANCELLING, new.id))
        return new

    if clear_vectors:
        new = run_locked(settings.database_url, app_table(target), "cancel", begin, policy)
        crash_point("cancel_begun")
        clear.drop_column_indexes(settings.database_url, new, policy, "cancel")
        done = clear.clear(settings.database_url, new, policy, step="cancel")
        log.info("cancel: %d new vectors of %s cleared (%d left locked by the app)",
                 done.rows, new.vector_column, done.left)
        crash_point("cancel_cleared")

    def drop_new(conn: psycopg.Connection) -> None:
        migration = require_open(conn, target, "filling", lock=True)  # before any table
        slot = slots_by_id(conn, target)[migration.to_slot]
        refuse_drop(conn, slot.table, slot.vector_column, "cancel")
        _drop_slot(conn, target, slot)
        # A side fill held the live column back: it is filled directly again.
        conn.execute("UPDATE pgreembed.slots SET paused = false, paused_by = NULL"
                     " WHERE id = %s AND paused_by = %s", (migration.from_slot, SIDE_FILL))
        conn.execute("UPDATE pgreembed.migrations SET phase = 'cancelled', finished_at = now()"
                     " WHERE id = %s", (migration.id,))

    run_locked(settings.database_url, app_table(target), "cancel", drop_new, policy,
               mode=ACCESS_EXCLUSIVE)
    crash_point("cancel")
    return StepResult()


def finalize(settings: Settings, target: Target, policy: LockPolicy | None = None,
             clear_vectors: bool = True) -> StepResult:
    """After the rollback window: drop the column that is not live any more. Run again
    after its commit (a crash before the caller heard of it), it has nothing to do.

    First (`clear_vectors`) the column's vectors leave the disk (migrations.clear): its
    slot is marked FINALIZING (no rollback from here, the scheduler stops keeping it
    current), its indexes are dropped and every row's value set to NULL in short
    transactions; an interrupted finalize resumes there. Then DROP COLUMN."""
    if _already_done(settings, target, "finalized"):
        return StepResult(already_done=True)
    policy = policy or LockPolicy()

    def begin(conn: psycopg.Connection) -> Slot:
        require_open(conn, target, "swapped", "rolled_back", lock=True)
        old = next(s for s in load_slots(conn, target) if s.role == "old")
        refuse_drop(conn, old.table, old.vector_column, "finalize")  # before anything goes
        conn.execute("UPDATE pgreembed.slots SET paused = true, paused_by = %s"
                     " WHERE id = %s", (FINALIZING, old.id))
        return old

    if clear_vectors:
        old = run_locked(settings.database_url, app_table(target), "finalize", begin, policy)
        crash_point("finalize_begun")
        clear.drop_column_indexes(settings.database_url, old, policy)
        done = clear.clear(settings.database_url, old, policy)
        log.info("finalize: %d old vectors of %s cleared (%d left locked by the app)",
                 done.rows, old.vector_column, done.left)
        crash_point("finalize_cleared")

    def drop_old(conn: psycopg.Connection) -> None:
        migration = require_open(conn, target, "swapped", "rolled_back", lock=True)
        old = next(s for s in load_slots(conn, target) if s.role == "old")
        refuse_drop(conn, old.table, old.vector_column, "finalize")
        _drop_slot(conn, target, old)
        conn.execute("UPDATE pgreembed.migrations SET phase = 'finalized', finished_at = now()"
                     " WHERE id = %s", (migration.id,))

    run_locked(settings.database_url, app_table(target), "finalize", drop_old, policy,
               mode=ACCESS_EXCLUSIVE)
    crash_point("finalize")
    return StepResult()


def _last_phase(conn: psycopg.Connection, target: Target) -> str | None:
    row = conn.execute("SELECT phase FROM pgreembed.migrations WHERE target = %s"
                       " ORDER BY id DESC LIMIT 1", (target.name,)).fetchone()
    return None if row is None else str(row[0])
