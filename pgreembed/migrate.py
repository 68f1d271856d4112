"""Re-embedding migrations: a new column filled side by side, indexed, swapped in atomically.

    plan -> start (new column, filled by the normal scheduler/workers alongside traffic)
         -> index (CREATE INDEX CONCURRENTLY) -> swap (one short transaction)
         -> rollback (the same swap backwards) | finalize (drop the previous column)
    cancel (before a swap) drops the new column and leaves the table as it was.

A swap exchanges the *names* of the two columns (and of their ANN indexes), so
the application keeps querying the same column name. Both columns stay
maintained after a swap (the trigger clears both on a text change and the
scheduler fills both), so a rollback is instant and still correct. All state
lives in Postgres (`pgreembed.migrations`, `pgreembed.slots`): every step can
be re-run after a crash.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import psycopg
from psycopg import sql

from pgreembed.budgets import configured_budget, record_budget, recorded_budget
from pgreembed.config import Budget, Settings, Target, canonical_distance, opclass_distance
from pgreembed.db import connect
from pgreembed.schema import (
    create_state_table,
    ensure_model,
    ensure_pending_index,
    ensure_vector_column,
    install_triggers,
)
from pgreembed.slots import Slot, load_slots, vector_type_for
from pgreembed.spend import SPEND_CAP
from pgreembed.table_lock import ACCESS_EXCLUSIVE, LockPolicy, run_locked

log = logging.getLogger(__name__)

# USD per 1M input tokens, for plan's estimate (unknown models: no estimate).
PRICES_PER_MTOKEN = {
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
    "text-embedding-ada-002": 0.10,
}
SWAP_COLUMN = "pgreembed__swap"


class MigrationError(RuntimeError):
    """A migration step cannot run now; the message says why and what to do."""


@dataclass(frozen=True)
class Migration:
    id: int
    target: str
    phase: str
    from_slot: int
    to_slot: int


def open_migration(conn: psycopg.Connection, target: Target) -> Migration | None:
    row = conn.execute(
        "SELECT id, target, phase, from_slot, to_slot FROM pgreembed.migrations"
        " WHERE target = %s AND phase IN ('filling', 'swapped', 'rolled_back')",
        (target.name,)).fetchone()
    return None if row is None else Migration(*row)


def _slots_by_id(conn: psycopg.Connection, target: Target) -> dict[int, Slot]:
    return {s.id: s for s in load_slots(conn, target)}


def _require_open(conn: psycopg.Connection, target: Target, *phases: str) -> Migration:
    migration = open_migration(conn, target)
    if migration is None:
        raise MigrationError(f"target {target.name!r} has no migration in progress")
    if phases and migration.phase not in phases:
        raise MigrationError(f"target {target.name!r}: migration {migration.id} is"
                             f" {migration.phase}; this step needs {' or '.join(phases)}")
    return migration


def _table(target: Target) -> sql.Identifier:
    return sql.Identifier(target.schema, target.table)


def new_column_name(target: Target, model_id: int) -> str:
    return f"{target.vector_column}__m{model_id}"


# -- plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    rows: int
    rows_without_text: int
    tokens: int
    tokens_exact: bool
    cost_usd: float | None
    minutes_at_rate_limit: float | None
    budget: Budget  # of the new model: what bounds the fill's speed
    storage_bytes: int
    column: str
    column_type: str
    statements: list[str]
    blockers: list[str]
    notes: list[str]


def plan(settings: Settings, target: Target, provider: str, model: str, dimensions: int,
         sample_limit: int = 100_000, budget: Budget | None = None) -> Plan:
    """What `start` would do and cost; changes nothing. `budget` is what `start` would be
    given; the time estimate uses every budget of the new model (see pgreembed.budgets)."""
    from pgreembed.plan_sql import migration_statements
    from pgreembed.providers import make_provider
    from pgreembed.slots import text_expression

    blockers: list[str] = []
    notes: list[str] = []
    if dimensions > 16000:
        blockers.append(f"{dimensions} dimensions: pgvector columns hold at most 16000")
    kind = vector_type_for(dimensions)
    if kind == "halfvec":
        notes.append(f"{dimensions} > 2000 dimensions: the column is halfvec({dimensions}),"
                     " since pgvector indexes `vector` only up to 2000 dims")
    table = sql.Identifier(target.schema, target.table)
    text = text_expression(target)
    with connect(settings.database_url) as conn:
        total, empty = conn.execute(sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE coalesce(btrim(({})::text), '') = '')"
            " FROM {}").format(text, table)).fetchone() or (0, 0)
        sample = [r[0] for r in conn.execute(sql.SQL(
            "SELECT ({})::text FROM {} WHERE coalesce(btrim(({})::text), '') <> '' LIMIT %s"
        ).format(text, table, text), (sample_limit,))]
        model_id_row = conn.execute("SELECT id FROM pgreembed.models WHERE key = %s",
                                    (f"{provider}:{model}@{dimensions}",)).fetchone()
        live = next((s for s in load_slots(conn, target) if s.role == "live"), None)
        if live is None:
            raise MigrationError(f"target {target.name!r} is not initialised: pgreembed init")
        index_method, index_distance = index_defaults(conn, live)
        budget = (budget or Budget()).tighter(configured_budget(settings, provider, model))
        if provider == "openai":
            budget = budget.tighter(recorded_budget(conn, provider, model))
        column = (new_column_name(target, model_id_row[0]) if model_id_row
                  else f"{target.vector_column}__m<id>")
        statements = migration_statements(
            conn, live, column, f"{kind}({dimensions})", index_method,
            f"{kind}_{index_distance}_ops", [i.name for i in column_indexes(conn, live)],
            SWAP_COLUMN)
    if empty:
        blockers.append(f"{empty} rows have no text: they will be recorded as failures and"
                        " the swap waits for them (fix or delete them first)")
    embedder = make_provider(settings, provider, model, dimensions)
    counted = sum(embedder.count_tokens(sample)) if sample else 0
    with_text = total - empty
    exact = len(sample) == with_text
    tokens = counted if exact else math.ceil(counted / max(1, len(sample)) * with_text)
    price = PRICES_PER_MTOKEN.get(model) if provider == "openai" else 0.0
    cost = None if price is None else tokens / 1e6 * price
    element = 2 if kind == "halfvec" else 4
    storage = total * (element * dimensions + 8)
    # The new model's shared budgets bound the fill; without them only the workers do.
    limits = []
    if budget.tokens_per_minute:
        limits.append(tokens / budget.tokens_per_minute)
    if budget.requests_per_minute:
        limits.append(math.ceil(with_text / target.batch_size) / budget.requests_per_minute)
    minutes = max(limits) if limits and provider == "openai" else None
    return Plan(total, empty, tokens, exact, cost, minutes, budget, storage, column,
                f"{kind}({dimensions})", statements, blockers, notes)


# -- start / pause / resume / cancel ------------------------------------------------------


def start(settings: Settings, target: Target, provider: str, model: str,
          dimensions: int, spend_cap_usd: float | None = None, batch_api: bool = False,
          budget: Budget | None = None, policy: LockPolicy | None = None) -> Slot:
    """Add the new column and register it; the scheduler starts filling it at once.

    With a spend cap, the migration pauses once the tokens sent for the new column
    cost that much (at the model's list price). A budget is recorded for the new
    model, where every worker reads it (re-running start with another one updates it)."""
    if provider == "local" and dimensions != 384:
        raise MigrationError("the local model produces 384 dimensions")
    budget = budget or Budget()
    if budget and provider != "openai":
        raise MigrationError("--requests-per-minute/--tokens-per-minute apply to the openai"
                             " provider only")
    new_target = replace(target, provider=provider, model=model, dimensions=dimensions)
    if batch_api and provider != "openai":
        raise MigrationError("--batch-api needs the openai provider")

    def add_column(conn: psycopg.Connection) -> tuple[Slot, bool]:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('pgreembed.init'))")
        existing = open_migration(conn, target)
        if existing is not None:
            slot = _slots_by_id(conn, target).get(existing.to_slot)
            if existing.phase == "filling" and slot and slot.model_key == new_target.model_key:
                record_budget(conn, slot.model_id, budget)
                return slot, False  # re-run after a crash: idempotent
            raise MigrationError(f"target {target.name!r} already has migration {existing.id}"
                                 f" ({existing.phase}); finish or cancel it first")
        live = next((s for s in load_slots(conn, target) if s.role == "live"), None)
        if live is None:
            raise MigrationError(f"target {target.name!r} is not initialised: pgreembed init")
        if live.model_key == new_target.model_key:
            raise MigrationError(f"target {target.name!r} already uses {live.model_key}")
        model_id = ensure_model(conn, new_target)
        record_budget(conn, model_id, budget)
        column = new_column_name(target, model_id)
        ensure_vector_column(conn, target, column, dimensions)
        row = conn.execute(
            """
            INSERT INTO pgreembed.slots (target, schema_name, table_name, vector_column,
                                         primary_key, pk_type, role, model_id, mode)
            VALUES (%s, %s, %s, %s, %s, %s, 'next', %s, %s) RETURNING id
            """, (target.name, target.schema, target.table, column, live.primary_key,
                  live.pk_type, model_id, "batch" if batch_api else "queue")).fetchone()
        assert row is not None
        price = PRICES_PER_MTOKEN.get(model, 0.0) if provider == "openai" else 0.0
        if batch_api:
            price /= 2  # the Batch API bills half
        if spend_cap_usd is not None and not price:
            raise MigrationError(f"no list price known for {model!r}: a spend cap cannot be"
                                 " enforced")
        conn.execute(
            "INSERT INTO pgreembed.migrations (target, from_slot, to_slot, phase,"
            " spend_cap_usd, price_per_mtoken) VALUES (%s, %s, %s, 'filling', %s, %s)",
            (target.name, live.id, row[0], spend_cap_usd, price))
        slots = load_slots(conn, target)
        new_slot = next(s for s in slots if s.id == row[0])
        create_state_table(conn, new_slot)
        if target.trigger:
            install_triggers(conn, target, slots)
        return new_slot, True

    new_slot, created = run_locked(settings.database_url, _table(target), "migrate start",
                                   add_column, policy, mode=ACCESS_EXCLUSIVE)
    _finish_start(settings, target)
    if created:
        log.info("migration of %s to %s started: column %s", target.name, new_slot.model_key,
                 new_slot.vector_column)
    return new_slot


def _finish_start(settings: Settings, target: Target) -> None:
    with connect(settings.database_url, autocommit=True) as conn:
        for slot in load_slots(conn, target):
            ensure_pending_index(conn, slot)


def pause(settings: Settings, target: Target) -> None:
    """Stop filling (queued batches are dropped); a pause by the spend cap stays one."""
    with connect(settings.database_url) as conn:
        migration = _require_open(conn, target, "filling")
        conn.execute("UPDATE pgreembed.slots SET paused = true,"
                     " paused_by = CASE WHEN paused THEN paused_by ELSE 'operator' END"
                     " WHERE id = %s", (migration.to_slot,))
        conn.commit()


class KeepCap:
    """`resume` without --spend-cap: the cap stays as it is."""


KEEP_CAP = KeepCap()


def resume(settings: Settings, target: Target,
           spend_cap_usd: float | None | KeepCap = KEEP_CAP) -> None:
    """Fill again. A migration its spend cap paused resumes only with a raised cap
    (`spend_cap_usd`) or none (None): with the same cap it would pause again at once."""
    with connect(settings.database_url) as conn:
        migration = _require_open(conn, target, "filling")
        row = conn.execute(
            "SELECT s.paused_by FROM pgreembed.migrations m JOIN pgreembed.slots s"
            " ON s.id = m.to_slot WHERE m.id = %s FOR UPDATE OF m, s",
            (migration.id,)).fetchone()
        assert row is not None
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


def cancel(settings: Settings, target: Target, policy: LockPolicy | None = None) -> None:
    """Before a swap: drop the new column; the live column is untouched."""
    def drop_new(conn: psycopg.Connection) -> None:
        migration = _require_open(conn, target, "filling")
        slot = _slots_by_id(conn, target)[migration.to_slot]
        _drop_slot(conn, target, slot)
        conn.execute("UPDATE pgreembed.migrations SET phase = 'cancelled', finished_at = now()"
                     " WHERE id = %s", (migration.id,))

    run_locked(settings.database_url, _table(target), "cancel", drop_new, policy,
               mode=ACCESS_EXCLUSIVE)


def finalize(settings: Settings, target: Target, policy: LockPolicy | None = None) -> None:
    """After the rollback window: drop the column that is not live any more."""
    def drop_old(conn: psycopg.Connection) -> None:
        migration = _require_open(conn, target, "swapped", "rolled_back")
        old = next(s for s in load_slots(conn, target) if s.role == "old")
        _drop_slot(conn, target, old)
        conn.execute("UPDATE pgreembed.migrations SET phase = 'finalized', finished_at = now()"
                     " WHERE id = %s", (migration.id,))

    run_locked(settings.database_url, _table(target), "finalize", drop_old, policy,
               mode=ACCESS_EXCLUSIVE)


# -- index ----------------------------------------------------------------------------


def ann_index_name(slot: Slot) -> str:
    return f"pgreembed_ann_{slot.id}"


def index_defaults(conn: psycopg.Connection, live: Slot, method: str | None = None,
                   distance: str | None = None) -> tuple[str, str]:
    """(method, distance) for the new column's index: as asked, else as the live column's
    ANN index (the app's queries use its operator), else hnsw + the target's distance."""
    live_ann = [i for i in column_indexes(conn, live) if i.valid and i.distance]
    method = method or (live_ann[0].method if live_ann else "hnsw")
    distance = canonical_distance(
        distance or (live_ann[0].distance if live_ann else None) or live.target.distance)
    return method, distance


def build_index(settings: Settings, target: Target, method: str | None = None,
                distance: str | None = None, m: int = 16, ef_construction: int = 64,
                lists: int | None = None, maintenance_work_mem: str = "512MB") -> str:
    """CREATE INDEX CONCURRENTLY on the new column; an INVALID leftover is dropped first.

    Method and distance default to the live column's ANN index, so the app's queries
    (which use that index's operator) keep using an index after the swap; without
    one, HNSW for the target's configured `distance`.
    """
    with connect(settings.database_url, autocommit=True) as conn:
        migration = _require_open(conn, target, "filling")
        slots = _slots_by_id(conn, target)
        slot = slots[migration.to_slot]
        method, distance = index_defaults(conn, slots[migration.from_slot], method, distance)
        name = ann_index_name(slot)
        existing = next((i for i in column_indexes(conn, slot) if i.name == name), None)
        if existing is not None and existing.valid and (existing.method, existing.distance) == (
                method, distance):
            return name
        if existing is not None:
            why = ("INVALID, left by an interrupted build" if not existing.valid else
                   f"{existing.method} for {existing.distance}, not {method} for {distance}")
            log.warning("dropping index %s (%s) to build it again", name, why)
            conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
                sql.Identifier(target.schema, name)))
        opclass = f"{slot.vector_type}_{distance}_ops"
        if method == "hnsw":
            params = sql.SQL("WITH (m = {}, ef_construction = {})").format(
                sql.Literal(m), sql.Literal(ef_construction))
        elif method == "ivfflat":
            rows_row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(slot.table)
                                    ).fetchone()
            rows = rows_row[0] if rows_row else 0
            chosen = lists or max(1, rows // 1000 if rows <= 1_000_000 else int(math.sqrt(rows)))
            params = sql.SQL("WITH (lists = {})").format(sql.Literal(chosen))
        else:
            raise MigrationError(f"index method must be hnsw or ivfflat, got {method!r}")
        conn.execute(sql.SQL("SET maintenance_work_mem = {}").format(
            sql.Literal(maintenance_work_mem)))
        conn.execute(sql.SQL(
            "CREATE INDEX CONCURRENTLY {name} ON {table} USING {method} ({column} {opclass})"
            " {params}").format(name=sql.Identifier(name), table=slot.table,
                                method=sql.SQL(method), column=slot.vector,
                                opclass=sql.Identifier(opclass), params=params))
        return name


# -- swap / rollback --------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnIndex:
    """An index on a slot's column: its method and the distance its opclass serves."""

    name: str
    valid: bool
    method: str
    distance: str | None  # opclass suffix (cosine, l2, ip, l1, ...); None if not a vector opclass


def column_indexes(conn: psycopg.Connection, slot: Slot) -> list[ColumnIndex]:
    """The indexes on the slot's column, except our pending index."""
    rows = conn.execute(
        """
        SELECT c.relname, i.indisvalid AND i.indisready, am.amname,
               (SELECT o.opcname FROM pg_opclass o
                WHERE o.oid = i.indclass[array_position(i.indkey::int2[], a.attnum)])  -- 0-based
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indexrelid
        JOIN pg_am am ON am.oid = c.relam
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
        WHERE i.indrelid = %s::regclass AND a.attname = %s
        ORDER BY c.relname
        """, (slot.table.as_string(conn), slot.vector_column)).fetchall()
    return [ColumnIndex(name, valid, method, opclass_distance(opclass))
            for name, valid, method, opclass in rows
            if not name.startswith("pgreembed_pending_")]


# Rows searchable now that a swap may leave unsearchable for the seconds the workers take to
# embed them for the new live model: about what one worker round trip fills. Under a steady
# write load the incoming column trails the live one by rows in flight; waiting for zero
# would never end (measured: 4-285 such rows at 20-150 updates/s).
DEFAULT_MAX_UNSEARCHABLE = 100


@dataclass(frozen=True)
class Readiness:
    """What stands between `incoming` and becoming live.

    `unsearchable`: rows with a vector in the live column and none in the incoming one,
    failed rows aside: they would drop out of search results until re-embedded. Rows NULL
    in both columns (just inserted or edited) are pending before and after alike.
    `failed`: rows searchable now whose incoming embedding failed for their current text.
    `problems`: what waiting cannot fix (indexes).
    """

    unsearchable: int
    failed: int
    problems: list[str]


def _unsearchable_counts(conn: psycopg.Connection, live: Slot, incoming: Slot
                         ) -> tuple[int, int]:
    """(unsearchable, failed) as defined by Readiness; found through the incoming
    column's partial pending index, so it stays fast enough to run under the swap lock."""
    row = conn.execute(sql.SQL(
        """
        SELECT count(*) FILTER (WHERE s.pgr_failed_hash IS DISTINCT FROM {hash}),
               count(*) FILTER (WHERE s.pgr_failed_hash = {hash})
        FROM {table} a LEFT JOIN {state} s ON s.pgr_pk = a.{pk}
        WHERE a.{incoming} IS NULL AND a.{live} IS NOT NULL
        """).format(hash=incoming.hash_expr, table=incoming.table, state=incoming.state_table,
                    pk=incoming.pk, incoming=incoming.vector, live=live.vector)).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def readiness(conn: psycopg.Connection, live: Slot, incoming: Slot, *,
              check_indexes: bool = True) -> Readiness:
    """Whether `incoming` may replace `live` now (see Readiness)."""
    unsearchable, failed = _unsearchable_counts(conn, live, incoming)
    return Readiness(unsearchable, failed,
                     index_problems(conn, live, incoming) if check_indexes else [])


def index_problems(conn: psycopg.Connection, live: Slot, incoming: Slot) -> list[str]:
    """Why the app's queries would lose their index if `incoming` became live."""
    problems = []
    incoming_indexes = column_indexes(conn, incoming)
    invalid = [i.name for i in incoming_indexes if not i.valid]
    if invalid:
        problems.append(f"index {', '.join(invalid)} on {incoming.vector_column} is INVALID:"
                        " run `migrate index` again")
    live_distances = {i.distance for i in column_indexes(conn, live) if i.distance}
    if live_distances and not incoming_indexes:
        problems.append(f"{live.vector_column} has an index but {incoming.vector_column} has"
                        " none: run `migrate index`")
    served = {i.distance for i in incoming_indexes if i.valid and i.distance}
    unserved = sorted(live_distances - served)
    if incoming_indexes and unserved:
        # The app queries with the live index's operator: after the swap it would scan.
        problems.append(f"{live.vector_column} is indexed for {', '.join(unserved)} distance but"
                        f" no index on {incoming.vector_column} is: run `migrate index"
                        f" --distance {unserved[0]}`")
    return problems


def _exchange(conn: psycopg.Connection, live: Slot, other: Slot, other_role: str) -> None:
    """Exchange the two columns' names, their ANN indexes' names and their roles.

    Renaming a column does not rename its index, so an application's index name
    (say docs_embedding_idx) is moved onto the column that becomes live.
    """
    live_indexes = [i.name for i in column_indexes(conn, live)]
    other_indexes = [i.name for i in column_indexes(conn, other)]
    rename = sql.SQL("ALTER TABLE {} RENAME COLUMN {} TO {}")
    conn.execute(rename.format(live.table, live.vector, sql.Identifier(SWAP_COLUMN)))
    conn.execute(rename.format(live.table, other.vector, live.vector))
    conn.execute(rename.format(live.table, sql.Identifier(SWAP_COLUMN), other.vector))
    if len(live_indexes) == 1 and len(other_indexes) == 1:
        schema = live.target.schema
        index_rename = sql.SQL("ALTER INDEX {} RENAME TO {}")
        conn.execute(index_rename.format(sql.Identifier(schema, live_indexes[0]),
                                         sql.Identifier(SWAP_COLUMN)))
        conn.execute(index_rename.format(sql.Identifier(schema, other_indexes[0]),
                                         sql.Identifier(live_indexes[0])))
        conn.execute(index_rename.format(sql.Identifier(schema, SWAP_COLUMN),
                                         sql.Identifier(other_indexes[0])))
    # The registry follows: each slot keeps its state table, model and pending index.
    conn.execute("UPDATE pgreembed.slots SET role = %s, vector_column = %s WHERE id = %s",
                 (other_role, other.vector_column, live.id))
    conn.execute("UPDATE pgreembed.slots SET role = 'live', vector_column = %s WHERE id = %s",
                 (live.vector_column, other.id))


@dataclass(frozen=True)
class SwapResult:
    attempts: int  # lock attempts (each waited at most the policy's lock_timeout)
    pause_seconds: float  # ACCESS EXCLUSIVE held: from the lock granted to the commit
    waited_seconds: float  # from the call to the commit (catching up and lock attempts)
    unsearchable: int  # rows left unsearchable for the seconds until they are embedded


@dataclass(frozen=True)
class SwapWait:
    """Progress while a swap waits for the incoming column to catch up."""

    seconds: float
    unsearchable: int
    allowed: int


class _NotReady(Exception):
    """Rows changed between the check and the lock: roll back, wait again."""


def _pair(conn: psycopg.Connection, target: Target) -> tuple[Slot, Slot]:
    slots = load_slots(conn, target)
    live = next(s for s in slots if s.role == "live")
    other = next(s for s in slots if s.role in ("next", "old"))
    return live, other


def swap(settings: Settings, target: Target, *, rollback: bool = False,
         catch_up_timeout: float = 300.0, max_unsearchable: int = DEFAULT_MAX_UNSEARCHABLE,
         accept_failed: bool = False, policy: LockPolicy | None = None,
         on_wait: Callable[[SwapWait], None] | None = None) -> SwapResult:
    """Make the other column live in one short transaction.

    Waits, holding no lock, until at most `max_unsearchable` rows that are searchable now
    would not be after the swap (see Readiness), then takes the table lock with short,
    jittered attempts (table_lock), re-counts under the lock and renames. Rows that failed
    in the incoming column stop it at once unless `accept_failed`. A rollback is the same
    swap backwards; it checks no index: the kept column still has the indexes it had.
    """
    phases = ("swapped",) if rollback else ("filling", "rolled_back")
    step = "rollback" if rollback else "swap"
    asked = time.monotonic()
    deadline = asked + catch_up_timeout
    attempts = 0

    def count_busy(attempt: int, _: object) -> None:
        nonlocal attempts
        attempts = attempt

    while True:
        with connect(settings.database_url) as conn:
            _require_open(conn, target, *phases)
            live, other = _pair(conn, target)
            ready = readiness(conn, live, other, check_indexes=not rollback)
            conn.rollback()
        if ready.problems:
            raise MigrationError("; ".join(ready.problems))
        if ready.failed and not accept_failed:
            raise MigrationError(
                f"{ready.failed} rows searchable now failed to embed in"
                f" {other.vector_column} ({other.model_key}) and would drop out of search:"
                f" see `pgreembed failures --target {target.name} --column"
                f" {other.vector_column}`; fix them and add --retry, or pass --accept-failed")
        waited = time.monotonic() - asked
        if ready.unsearchable > max_unsearchable:
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"{ready.unsearchable} rows still have a vector in {live.vector_column}"
                    f" but none in {other.vector_column} after {waited:.0f} s (allowed:"
                    f" {max_unsearchable}); the workers are not keeping up (`pgreembed"
                    " status`): try again, or raise --timeout or --max-unsearchable")
            if on_wait is not None:
                on_wait(SwapWait(waited, ready.unsearchable, max_unsearchable))
            time.sleep(0.5)
            continue
        locked_at = 0.0

        def exchange(conn: psycopg.Connection) -> int:
            nonlocal locked_at
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(_table(target)))
            locked_at = time.monotonic()
            migration = _require_open(conn, target, *phases)
            live, other = _pair(conn, target)
            unsearchable, failed = _unsearchable_counts(conn, live, other)
            if unsearchable > max_unsearchable or (failed and not accept_failed):
                raise _NotReady()
            _exchange(conn, live, other, "old")
            conn.execute("UPDATE pgreembed.migrations SET phase = %s, swapped_at = now()"
                         " WHERE id = %s", ("rolled_back" if rollback else "swapped",
                                            migration.id))
            conn.execute("UPDATE pgreembed.slots SET paused = false WHERE id = %s", (other.id,))
            return unsearchable

        try:
            left = run_locked(settings.database_url, _table(target), step, exchange, policy,
                              mode=ACCESS_EXCLUSIVE,
                              on_busy=count_busy)
        except _NotReady:
            continue  # rows changed between the check and the lock
        done = time.monotonic()
        return SwapResult(attempts + 1, done - locked_at, done - asked, left)


# -- status ---------------------------------------------------------------------------


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


def spend(conn: psycopg.Connection, slot_id: int) -> tuple[int, float, float | None]:
    """(tokens sent, USD spent, USD cap) for the migration filling `slot_id`."""
    row = conn.execute(
        """
        SELECT coalesce((SELECT sum(tokens) FROM pgreembed.usage WHERE slot_id = %s), 0),
               m.price_per_mtoken, m.spend_cap_usd
        FROM pgreembed.migrations m WHERE m.to_slot = %s ORDER BY m.id DESC LIMIT 1
        """, (slot_id, slot_id)).fetchone()
    if row is None:
        return 0, 0.0, None
    tokens = int(row[0])
    price = float(row[1] or 0)
    return tokens, tokens / 1e6 * price, None if row[2] is None else float(row[2])


def enforce_spend_cap(conn: psycopg.Connection, slot: Slot) -> bool:
    """Pause a filling migration whose spend reached its cap; True if it is paused now."""
    if slot.role != "next":
        return False
    _, spent, cap = spend(conn, slot.id)
    if cap is None or spent < cap:
        return False
    conn.execute("UPDATE pgreembed.slots SET paused = true, paused_by = %s WHERE id = %s",
                 (SPEND_CAP, slot.id))
    conn.commit()
    log.warning("migration of %s paused: spent $%.4f of its $%.4f cap (raise it: migrate"
                " resume --spend-cap USD)", slot.target.name, spent, cap)
    return True


def progress(settings: Settings, target: Target) -> Progress:
    with connect(settings.database_url) as conn:
        migration = _require_open(conn, target)
        slots = _slots_by_id(conn, target)
        slot = slots.get(migration.to_slot) or slots[migration.from_slot]
        if slot.role == "live":  # after a swap, report on the column being kept for rollback
            slot = slots[migration.from_slot]
        row = conn.execute(sql.SQL(
            """
            SELECT count(*), count(a.{v}), count(s.pgr_failed_hash),
                   count(*) FILTER (WHERE s.pgr_embedded_at > now() - interval '60 seconds')
            FROM {table} a LEFT JOIN {state} s ON s.pgr_pk = a.{pk}
            """).format(v=slot.vector, table=slot.table, state=slot.state_table, pk=slot.pk)
        ).fetchone()
        assert row is not None
        indexes = column_indexes(conn, slot)
        tokens, spent, cap = spend(conn, migration.to_slot)
        paused_by = conn.execute("SELECT paused_by FROM pgreembed.slots WHERE id = %s AND"
                                 " paused", (slot.id,)).fetchone()
    total, done, failed, recent = (int(x) for x in row)
    rate = recent / 60.0
    left = total - done - failed
    eta = (left / rate) if rate > 0 else (0.0 if left == 0 else None)
    return Progress(migration, slot.vector_column, slot.model_key, total, done, failed, rate,
                    eta, slot.paused, indexes, tokens, spent, cap,
                    paused_by[0] if paused_by else None)
