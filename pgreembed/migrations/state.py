"""An open migration and the names it gives columns: what every migration step starts from."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.errors import MigrationError
from pgreembed.store.blockers import row_holders
from pgreembed.store.slots import Slot, load_slots
from pgreembed.store.table_lock import RowBusy

SWAP_COLUMN = "pgreembed__swap"
# A migration in one of these phases is open (the target's one at a time).
OPEN = "phase IN ('filling', 'swapped', 'rolled_back')"


@dataclass(frozen=True)
class Migration:
    id: int
    target: str
    phase: str
    from_slot: int
    to_slot: int


def open_migration(conn: psycopg.Connection, target: Target, *, lock: bool = False
                   ) -> Migration | None:
    """`lock`: the row is locked (FOR UPDATE) until the transaction ends; a step that
    changes the phase (swap, rollback, cancel, finalize) takes it first, before any table
    lock, and so does every pause: under it the phase read is the phase at commit."""
    query = ("SELECT id, target, phase, from_slot, to_slot FROM pgreembed.migrations"
             f" WHERE target = %s AND {OPEN}")
    if not lock:
        row = conn.execute(query, (target.name,)).fetchone()
        return None if row is None else Migration(*row)
    # A savepoint: after a lock timeout the transaction can still read who holds the row.
    conn.execute("SAVEPOINT migration_row")
    try:
        row = conn.execute(query + " FOR UPDATE", (target.name,)).fetchone()
    except psycopg.errors.LockNotAvailable:
        conn.execute("ROLLBACK TO SAVEPOINT migration_row")
        holders = row_holders(conn, sql.SQL("pgreembed.migrations"),
                              sql.SQL(f"t.target = %s AND t.{OPEN}"), (target.name,))
        raise RowBusy(f"the migration row of target {target.name!r}", holders,
                      "a pause, a resume or a spend reservation holds it while it runs (no"
                      " table lock is taken meanwhile): try again once it has committed"
                      ) from None
    conn.execute("RELEASE SAVEPOINT migration_row")
    return None if row is None else Migration(*row)


def slots_by_id(conn: psycopg.Connection, target: Target) -> dict[int, Slot]:
    """The target's active slots by id: a migration row names its columns by slot id."""
    return {s.id: s for s in load_slots(conn, target)}


def require_open(conn: psycopg.Connection, target: Target, *phases: str,
                 lock: bool = False) -> Migration:
    """The target's open migration, if it is in one of `phases` (any, if none given);
    else MigrationError saying what this step needs: every step but `start` checks it.
    `lock`: see open_migration."""
    migration = open_migration(conn, target, lock=lock)
    if migration is None:
        raise MigrationError(f"target {target.name!r} has no migration in progress")
    if phases and migration.phase not in phases:
        raise MigrationError(f"target {target.name!r}: migration {migration.id} is"
                             f" {migration.phase}; this step needs {' or '.join(phases)}")
    return migration


def new_column_name(target: Target, model_id: int) -> str:
    return f"{target.vector_column}__m{model_id}"


# paused_by of a column being cleared: finalize clears the replaced column, cancel the new
# one. Its vectors are being thrown away, so nothing may make it live or fill it again.
FINALIZING = "finalize"
CANCELLING = "cancel"


def refuse_if_clearing(conn: psycopg.Connection, slot: Slot, step: str) -> None:
    """MigrationError when `slot` is being cleared by a finalize or cancel that began:
    making it live (swap, rollback), filling it (resume) or indexing it would serve or
    build on a column whose vectors are being removed. The way out: run that step again."""
    row = conn.execute("SELECT paused_by FROM pgreembed.slots WHERE id = %s",
                       (slot.id,)).fetchone()
    if row is None or row[0] not in (FINALIZING, CANCELLING):
        return
    raise MigrationError(
        f"{step} refused: {row[0]} has begun clearing {slot.vector_column} (its vectors are"
        f" being removed); run `pgreembed migrate {row[0]} --target {slot.target.name}`"
        " again to finish it")
