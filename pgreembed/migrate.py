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

from pgreembed.config import Settings, Target, canonical_distance, opclass_distance
from pgreembed.db import connect
from pgreembed.schema import (
    create_state_table,
    ensure_model,
    ensure_pending_index,
    ensure_vector_column,
    install_triggers,
)
from pgreembed.slots import Slot, load_slots, vector_type_for

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
    storage_bytes: int
    column: str
    column_type: str
    statements: list[str]
    blockers: list[str]
    notes: list[str]


def plan(settings: Settings, target: Target, provider: str, model: str, dimensions: int,
         sample_limit: int = 100_000) -> Plan:
    """What `start` would do and cost; changes nothing."""
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
    # The configured shared budgets bound the fill; without them only the workers do.
    limits = []
    if target.tokens_per_minute:
        limits.append(tokens / target.tokens_per_minute)
    if target.requests_per_minute:
        limits.append(math.ceil(with_text / target.batch_size) / target.requests_per_minute)
    minutes = max(limits) if limits else None
    return Plan(total, empty, tokens, exact, cost, minutes, storage, column,
                f"{kind}({dimensions})", statements, blockers, notes)


# -- start / pause / resume / cancel ------------------------------------------------------


def start(settings: Settings, target: Target, provider: str, model: str,
          dimensions: int, spend_cap_usd: float | None = None, batch_api: bool = False
          ) -> Slot:
    """Add the new column and register it; the scheduler starts filling it at once.

    With a spend cap, the scheduler pauses the migration once the tokens sent for
    the new column cost that much (at the model's list price)."""
    if provider == "local" and dimensions != 384:
        raise MigrationError("the local model produces 384 dimensions")
    new_target = replace(target, provider=provider, model=model, dimensions=dimensions)
    with connect(settings.database_url) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('pgreembed.init'))")
        existing = open_migration(conn, target)
        if existing is not None:
            slot = _slots_by_id(conn, target).get(existing.to_slot)
            if existing.phase == "filling" and slot and slot.model_key == new_target.model_key:
                conn.commit()
                _finish_start(settings, target)
                return slot  # re-run after a crash: idempotent
            raise MigrationError(f"target {target.name!r} already has migration {existing.id}"
                                 f" ({existing.phase}); finish or cancel it first")
        live = next((s for s in load_slots(conn, target) if s.role == "live"), None)
        if live is None:
            raise MigrationError(f"target {target.name!r} is not initialised: pgreembed init")
        if live.model_key == new_target.model_key:
            raise MigrationError(f"target {target.name!r} already uses {live.model_key}")
        model_id = ensure_model(conn, new_target)
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
        if batch_api and provider != "openai":
            raise MigrationError("--batch-api needs the openai provider")
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
        conn.commit()
    _finish_start(settings, target)
    log.info("migration of %s to %s started: column %s", target.name, new_slot.model_key,
             new_slot.vector_column)
    return new_slot


def _finish_start(settings: Settings, target: Target) -> None:
    with connect(settings.database_url, autocommit=True) as conn:
        for slot in load_slots(conn, target):
            ensure_pending_index(conn, slot)


def set_paused(settings: Settings, target: Target, paused: bool) -> None:
    with connect(settings.database_url) as conn:
        migration = _require_open(conn, target, "filling")
        conn.execute("UPDATE pgreembed.slots SET paused = %s WHERE id = %s",
                     (paused, migration.to_slot))
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


def cancel(settings: Settings, target: Target, attempts: int = 20) -> None:
    """Before a swap: drop the new column; the live column is untouched."""
    def drop_new(conn: psycopg.Connection) -> None:
        migration = _require_open(conn, target, "filling")
        slot = _slots_by_id(conn, target)[migration.to_slot]
        _drop_slot(conn, target, slot)
        conn.execute("UPDATE pgreembed.migrations SET phase = 'cancelled', finished_at = now()"
                     " WHERE id = %s", (migration.id,))

    _retry_while_busy(settings, "cancel", attempts, drop_new)


def finalize(settings: Settings, target: Target, attempts: int = 20) -> None:
    """After the rollback window: drop the column that is not live any more."""
    def drop_old(conn: psycopg.Connection) -> None:
        migration = _require_open(conn, target, "swapped", "rolled_back")
        old = next(s for s in load_slots(conn, target) if s.role == "old")
        _drop_slot(conn, target, old)
        conn.execute("UPDATE pgreembed.migrations SET phase = 'finalized', finished_at = now()"
                     " WHERE id = %s", (migration.id,))

    _retry_while_busy(settings, "finalize", attempts, drop_old)


def _retry_while_busy(settings: Settings, step: str, attempts: int,
                      work: Callable[[psycopg.Connection], None],
                      lock_timeout: str = "2s") -> None:
    """Run `work` in one transaction with lock_timeout, again while the table is busy.

    DROP COLUMN needs an ACCESS EXCLUSIVE lock: waiting for it without a timeout
    would queue every query of the app behind a long-running one.
    """
    busy = 0
    while True:
        with connect(settings.database_url) as conn:
            try:
                _set_lock_timeout(conn, lock_timeout)
                work(conn)
                conn.commit()
                return
            except psycopg.errors.LockNotAvailable:
                conn.rollback()
                busy += 1
                _wait_after_busy(step, busy, attempts, lock_timeout)


def _wait_after_busy(step: str, busy: int, attempts: int, lock_timeout: str) -> None:
    """After the `busy`-th lock timeout: back off before the next try, or give up."""
    if busy >= attempts:
        raise MigrationError(f"could not {step}: the table stayed busy through {attempts}"
                             f" attempts with lock_timeout {lock_timeout}; nothing changed,"
                             " try again")
    log.warning("%s attempt %d: table busy (lock_timeout %s); retrying",
                step, busy, lock_timeout)
    time.sleep(min(2.0, 0.1 * busy))


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


def _set_lock_timeout(conn: psycopg.Connection, timeout: str = "2s") -> None:
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(timeout)))


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


def _missing(conn: psycopg.Connection, slot: Slot) -> int:
    row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} IS NULL").format(
        slot.table, slot.vector)).fetchone()
    return int(row[0]) if row else 0


def check_ready(conn: psycopg.Connection, live: Slot, incoming: Slot) -> list[str]:
    """Why `incoming` may not replace `live` yet (empty list: it may)."""
    problems = []
    missing = _missing(conn, incoming)
    if missing:
        problems.append(f"{missing} rows have no vector in {incoming.vector_column} yet")
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
    attempts: int
    pause_seconds: float


def swap(settings: Settings, target: Target, *, rollback: bool = False,
         catch_up_timeout: float = 300.0, attempts: int = 20, lock_timeout: str = "2s"
         ) -> SwapResult:
    """Make the other column live in one short transaction (retried on lock timeouts).

    Waits (outside any lock) until rows changed since the fill are caught up, then
    re-checks inside the transaction, under the table lock, before renaming.
    """
    phases = ("swapped",) if rollback else ("filling", "rolled_back")
    deadline = time.monotonic() + catch_up_timeout
    busy = 0  # lock attempts that timed out; waiting for rows to catch up is not one
    step = "rollback" if rollback else "swap"
    while True:
        with connect(settings.database_url) as conn:
            migration = _require_open(conn, target, *phases)
            slots = _slots_by_id(conn, target)
            live = next(s for s in slots.values() if s.role == "live")
            other = next(s for s in slots.values() if s.role in ("next", "old"))
            problems = check_ready(conn, live, other)
            conn.rollback()
            if problems:
                if time.monotonic() > deadline or any("INVALID" in p or "index" in p
                                                      for p in problems):
                    raise MigrationError("; ".join(problems))
                time.sleep(0.5)  # rows changed meanwhile: let the workers catch up
                continue
            started = time.monotonic()
            try:
                _set_lock_timeout(conn, lock_timeout)
                conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(live.table))
                if _missing(conn, other):
                    conn.rollback()  # a row changed between the check and the lock
                    continue
                _exchange(conn, live, other, "old")
                conn.execute(
                    "UPDATE pgreembed.migrations SET phase = %s, swapped_at = now()"
                    " WHERE id = %s", ("rolled_back" if rollback else "swapped", migration.id))
                conn.execute("UPDATE pgreembed.slots SET paused = false WHERE id = %s",
                             (other.id,))
                conn.commit()
            except psycopg.errors.LockNotAvailable:
                conn.rollback()
                busy += 1
                _wait_after_busy(step, busy, attempts, lock_timeout)
                continue
            return SwapResult(busy + 1, time.monotonic() - started)


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
    conn.execute("UPDATE pgreembed.slots SET paused = true WHERE id = %s", (slot.id,))
    conn.commit()
    log.warning("migration of %s paused: spent $%.4f of its $%.4f cap (raise it or resume)",
                slot.target.name, spent, cap)
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
    total, done, failed, recent = (int(x) for x in row)
    rate = recent / 60.0
    left = total - done - failed
    eta = (left / rate) if rate > 0 else (0.0 if left == 0 else None)
    return Progress(migration, slot.vector_column, slot.model_key, total, done, failed, rate,
                    eta, slot.paused, indexes, tokens, spent, cap)
