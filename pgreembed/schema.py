"""`pgreembed init`: the bookkeeping in Postgres, created idempotently.

- schema `pgreembed` with the model and slot registries;
- per slot, a state table (model + content hash per row, recorded failures);
- on the app's table: the vector column if missing, a partial index over rows
  whose vector is NULL (so finding pending rows never scans the table), and
  optionally triggers that clear the vector when a *text* column changes (not
  when unrelated columns change) and NOTIFY the scheduler.
"""

from __future__ import annotations

import hashlib
import logging

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.slots import (
    NOTIFY_CHANNEL,
    Slot,
    clear_misconfigured,
    load_slots,
    primary_key_of,
    vector_type_for,
)
from pgreembed.table_lock import SHARE_ROW_EXCLUSIVE, LockPolicy, run_locked

log = logging.getLogger(__name__)

QUALITY_DDL = """
-- Quality gate (pgreembed/compare.py, pgreembed/tune.py): the comparisons `migrate compare`
-- ran (the last one is shown by `migrate swap`), and per slot the index settings `tune`
-- recommended, which pgreembed.search applies to its own statement.
CREATE TABLE IF NOT EXISTS pgreembed.comparisons (
    id bigserial PRIMARY KEY,
    migration_id integer NOT NULL REFERENCES pgreembed.migrations (id),
    measured_at timestamptz NOT NULL DEFAULT now(),
    report jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS comparisons_migration ON pgreembed.comparisons (migration_id, id);
CREATE TABLE IF NOT EXISTS pgreembed.index_settings (
    slot_id integer PRIMARY KEY REFERENCES pgreembed.slots (id),
    settings jsonb NOT NULL,
    index_name text NOT NULL,
    k integer NOT NULL,
    target_recall double precision NOT NULL,
    recall double precision NOT NULL,
    filter text,
    measured_at timestamptz NOT NULL DEFAULT now()
);
"""

REGISTRY_DDL = """
CREATE SCHEMA IF NOT EXISTS pgreembed;
CREATE TABLE IF NOT EXISTS pgreembed.models (
    id serial PRIMARY KEY,
    key text NOT NULL UNIQUE,
    provider text NOT NULL,
    name text NOT NULL,
    dimensions integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS pgreembed.slots (
    id serial PRIMARY KEY,
    target text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    vector_column text NOT NULL,
    primary_key text NOT NULL,
    pk_type text NOT NULL,
    role text NOT NULL CHECK (role IN ('live', 'next', 'old', 'dropped')),
    model_id integer NOT NULL REFERENCES pgreembed.models (id),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS slots_one_live ON pgreembed.slots (target)
    WHERE role = 'live';
ALTER TABLE pgreembed.slots ADD COLUMN IF NOT EXISTS paused boolean NOT NULL DEFAULT false;
ALTER TABLE pgreembed.slots ADD COLUMN IF NOT EXISTS mode text NOT NULL DEFAULT 'queue';
CREATE TABLE IF NOT EXISTS pgreembed.migrations (
    id serial PRIMARY KEY,
    target text NOT NULL,
    from_slot integer NOT NULL REFERENCES pgreembed.slots (id),
    to_slot integer NOT NULL REFERENCES pgreembed.slots (id),
    phase text NOT NULL CHECK (phase IN ('filling', 'swapped', 'rolled_back', 'finalized',
                                         'cancelled')),
    started_at timestamptz NOT NULL DEFAULT now(),
    swapped_at timestamptz,
    finished_at timestamptz
);
CREATE UNIQUE INDEX IF NOT EXISTS migrations_one_open ON pgreembed.migrations (target)
    WHERE phase IN ('filling', 'swapped', 'rolled_back');
-- Tokens sent to providers, one row per batch (insert-only: no hot row between workers).
CREATE TABLE IF NOT EXISTS pgreembed.usage (
    slot_id integer NOT NULL,
    at timestamptz NOT NULL DEFAULT now(),
    inputs integer NOT NULL,
    tokens bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_slot ON pgreembed.usage (slot_id, at);
-- The model that billed the tokens (a slot's model changes in place): its price applies.
ALTER TABLE pgreembed.usage ADD COLUMN IF NOT EXISTS model text;
ALTER TABLE pgreembed.migrations ADD COLUMN IF NOT EXISTS spend_cap_usd numeric;
ALTER TABLE pgreembed.migrations ADD COLUMN IF NOT EXISTS price_per_mtoken numeric;
-- Spend caps: a batch's estimated tokens, held from before its request until its billed
-- tokens are in pgreembed.usage (pgreembed/spend.py). Why a slot was paused.
CREATE TABLE IF NOT EXISTS pgreembed.spend_reservations (
    id bigserial PRIMARY KEY,
    slot_id integer NOT NULL,
    tokens bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS spend_reservations_slot ON pgreembed.spend_reservations (slot_id);
ALTER TABLE pgreembed.slots ADD COLUMN IF NOT EXISTS paused_by text;
-- Budgets recorded by `migrate start` for the model called (read by every worker).
ALTER TABLE pgreembed.models ADD COLUMN IF NOT EXISTS requests_per_minute integer;
ALTER TABLE pgreembed.models ADD COLUMN IF NOT EXISTS tokens_per_minute integer;
-- Why the provider cannot fill a slot as configured (pgreembed/embedding.py): no batch
-- is dispatched for it until `pgreembed init` clears it.
ALTER TABLE pgreembed.slots ADD COLUMN IF NOT EXISTS misconfigured text;
ALTER TABLE pgreembed.slots ADD COLUMN IF NOT EXISTS misconfigured_at timestamptz;
""" + QUALITY_DDL + """-- What the application reads to know which column and model are live.
CREATE OR REPLACE VIEW pgreembed.active_models AS
    SELECT s.target, s.schema_name, s.table_name, s.vector_column, m.provider,
           m.name AS model, m.dimensions
    FROM pgreembed.slots s JOIN pgreembed.models m ON m.id = s.model_id
    WHERE s.role = 'live';
CREATE OR REPLACE FUNCTION pgreembed.notify_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('""" + NOTIFY_CHANNEL + """', TG_ARGV[0]);
    RETURN NULL;
END $$;
"""


class SetupError(RuntimeError):
    """The database cannot host a target as configured; the message says how to fix it."""


def ensure_pgvector(conn: psycopg.Connection) -> None:
    """Create the extension if it is available; say exactly what is missing if not."""
    available = conn.execute(
        "SELECT default_version, installed_version FROM pg_available_extensions"
        " WHERE name = 'vector'"
    ).fetchone()
    if available is None:
        raise SetupError(
            "pgvector is not installed on this Postgres server: install the extension"
            " (package postgresql-<major>-pgvector, or build it from source) and retry"
        )
    if available[1] is None:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.errors.InsufficientPrivilege:
            raise SetupError(
                "pgvector is available but not enabled, and this role may not enable it:"
                " run `CREATE EXTENSION vector` as a superuser or the database owner"
            ) from None


def ensure_model(conn: psycopg.Connection, target: Target) -> int:
    row = conn.execute(
        """
        INSERT INTO pgreembed.models (key, provider, name, dimensions) VALUES (%s, %s, %s, %s)
        ON CONFLICT (key) DO UPDATE SET key = excluded.key RETURNING id
        """,
        (target.model_key, target.provider, target.model, target.dimensions),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _column_type(conn: psycopg.Connection, target: Target, column: str) -> str | None:
    row = conn.execute(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = %s::regclass AND attname = %s AND NOT attisdropped",
        (sql.Identifier(target.schema, target.table).as_string(conn), column),
    ).fetchone()
    return None if row is None else str(row[0])


def ensure_vector_column(conn: psycopg.Connection, target: Target, column: str,
                         dimensions: int) -> bool:
    """Add the column if missing (True); refuse a column of another type or size."""
    wanted = f"{vector_type_for(dimensions)}({dimensions})"
    found = _column_type(conn, target, column)
    if found is None:
        conn.execute(sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
            sql.Identifier(target.schema, target.table), sql.Identifier(column), sql.SQL(wanted)))
        log.info("added column %s %s to %s.%s", column, wanted, target.schema, target.table)
        return True
    if found != wanted:
        raise SetupError(
            f"target {target.name!r}: column {column!r} is {found}, expected {wanted}"
            f" for {target.model_key} (a model change is a migration: `pgreembed migrate`)"
        )
    return False


def _check_table(conn: psycopg.Connection, target: Target) -> None:
    exists = conn.execute(
        "SELECT to_regclass(%s)", (sql.Identifier(target.schema, target.table).as_string(conn),)
    ).fetchone()
    if exists is None or exists[0] is None:
        raise SetupError(f"target {target.name!r}: table {target.schema}.{target.table}"
                         " does not exist")
    for column in target.text_columns:
        if _column_type(conn, target, column) is None:
            raise SetupError(f"target {target.name!r}: text column {column!r} does not exist"
                             f" in {target.schema}.{target.table}")


def register_live_slot(conn: psycopg.Connection, target: Target) -> Slot:
    """The target's live slot, created on first init and kept in step with the config."""
    model_id = ensure_model(conn, target)
    pk, pk_type = primary_key_of(conn, target)
    live = [s for s in load_slots(conn, target) if s.role == "live"]
    migrated = conn.execute("SELECT count(*) FROM pgreembed.migrations WHERE target = %s",
                            (target.name,)).fetchone()
    if live and live[0].model_id != model_id and migrated and migrated[0]:
        # After a migration the registry, not the config, says which model is live.
        log.warning("target %s: config says %s but the live model is %s (migrated);"
                    " update the config", target.name, target.model_key, live[0].model_key)
        return live[0]
    if not live:
        conn.execute(
            """
            INSERT INTO pgreembed.slots (target, schema_name, table_name, vector_column,
                                         primary_key, pk_type, role, model_id)
            VALUES (%s, %s, %s, %s, %s, %s, 'live', %s)
            """,
            (target.name, target.schema, target.table, target.vector_column, pk, pk_type,
             model_id),
        )
    elif live[0].model_id != model_id and live[0].dimensions != target.dimensions:
        raise SetupError(
            f"target {target.name!r}: the live column holds {live[0].model_key}; changing to"
            f" {target.model_key} changes dimensions, which is a migration:"
            f" `pgreembed migrate start --target {target.name} --model {target.model}"
            f" --dimensions {target.dimensions}`")
    elif live[0].model_id != model_id:
        # Same column, other model of the same size: rows become "outdated" and are
        # re-embedded in place. Other sizes were refused by ensure_vector_column.
        log.warning("target %s: model changed to %s; rows will be re-embedded in place",
                    target.name, target.model_key)
        conn.execute("UPDATE pgreembed.slots SET model_id = %s WHERE id = %s",
                     (model_id, live[0].id))
    return next(s for s in load_slots(conn, target) if s.role == "live")


def create_state_table(conn: psycopg.Connection, slot: Slot) -> None:
    conn.execute(sql.SQL(
        """
        CREATE TABLE IF NOT EXISTS {state} (
            pgr_pk {pk_type} PRIMARY KEY,
            pgr_model_id integer,
            pgr_hash uuid,
            pgr_embedded_at timestamptz,
            pgr_truncated boolean NOT NULL DEFAULT false,
            pgr_failed_hash uuid,
            pgr_failure text,
            pgr_attempts integer NOT NULL DEFAULT 0,
            pgr_failed_at timestamptz
        )
        """).format(state=slot.state_table, pk_type=slot.pk_cast))
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (pgr_model_id, pgr_pk)").format(
        sql.Identifier(f"slot_{slot.id}_model"), slot.state_table))
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (pgr_pk)"
                         " WHERE pgr_failed_hash IS NOT NULL").format(
        sql.Identifier(f"slot_{slot.id}_failed"), slot.state_table))


def adopt_existing_vectors(conn: psycopg.Connection, slot: Slot) -> int:
    """Rows that already have a vector are taken as embedded by the configured model."""
    cur = conn.execute(sql.SQL(
        """
        INSERT INTO {state} (pgr_pk, pgr_model_id, pgr_hash, pgr_embedded_at)
        SELECT {pk}, %s, {hash}, now() FROM {table} WHERE {vector} IS NOT NULL
        ON CONFLICT (pgr_pk) DO NOTHING
        """).format(state=slot.state_table, pk=slot.pk, hash=slot.hash_expr, table=slot.table,
                    vector=slot.vector), (slot.model_id,))
    return cur.rowcount


def ensure_pending_index(dsn_conn: psycopg.Connection, slot: Slot) -> None:
    """Partial index of rows without a vector, built CONCURRENTLY (writes go on).

    Needs an autocommit connection. A failed concurrent build leaves an INVALID
    index behind; it is dropped and rebuilt.
    """
    name = slot.pending_index_name
    row = dsn_conn.execute(
        "SELECT i.indisvalid FROM pg_class c JOIN pg_index i ON i.indexrelid = c.oid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
        (slot.target.schema, name),
    ).fetchone()
    if row is not None and row[0]:
        return
    if row is not None:
        log.warning("dropping INVALID index %s left by an interrupted build", name)
        dsn_conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(
            sql.Identifier(slot.target.schema, name)))
    dsn_conn.execute(sql.SQL(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} ON {table} ({pk}) WHERE {vector} IS NULL"
    ).format(name=sql.Identifier(name), table=slot.table, pk=slot.pk, vector=slot.vector))


# Bump when the triggers install_triggers creates change: older ones are then replaced.
TRIGGERS_VERSION = 2


def _trigger_names(target: Target) -> list[str]:
    return [f"pgreembed_{kind}_{target.name}" for kind in ("clear", "notify", "forget",
                                                           "forget_all")]


def text_sql_columns(conn: psycopg.Connection, target: Target) -> tuple[str, ...]:
    """The app table's columns `text_sql` reads, as Postgres resolves the expression.

    A temporary view over the expression records a dependency on each column it
    reads (pg_depend); it is made in a savepoint that is rolled back, so nothing
    stays. Without this, editing a column the expression reads but text_columns
    does not list would never clear the vector: the text would silently go stale.
    """
    assert target.text_sql is not None
    table = sql.Identifier(target.schema, target.table)
    probe = sql.Identifier(f"pgreembed_text_sql_{target.name}")
    columns: list[tuple[int, str | None]] = []
    with conn.transaction():
        try:
            conn.execute(sql.SQL("CREATE TEMPORARY VIEW {} AS SELECT ({}) FROM {}").format(
                probe, sql.SQL(target.text_sql), table))
        except psycopg.Error as exc:
            raise SetupError(f"target {target.name!r}.text_sql: Postgres cannot evaluate it"
                             f" over {target.schema}.{target.table}:"
                             f" {exc.diag.message_primary or exc}") from None
        columns = [(int(r[0]), r[1]) for r in conn.execute(
            """
            SELECT DISTINCT d.refobjsubid, a.attname
            FROM pg_depend d
            JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
            LEFT JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
            WHERE r.ev_class = %s::regclass AND d.refobjid = %s::regclass
            ORDER BY d.refobjsubid
            """, (probe.as_string(conn), table.as_string(conn))).fetchall()]
        raise psycopg.Rollback  # the probe view goes with its savepoint
    if any(number == 0 for number, _ in columns):
        raise SetupError(f"target {target.name!r}.text_sql reads the whole row of"
                         f" {target.schema}.{target.table} (it would include the vector):"
                         " name the columns it needs")
    return tuple(name for _, name in columns if name is not None)


def trigger_columns(conn: psycopg.Connection, target: Target, slots: list[Slot]
                    ) -> tuple[str, ...]:
    """The columns whose change must clear the vectors: text_columns, plus every column
    text_sql reads (which text_columns may not list)."""
    if not target.text_sql:
        return target.text_columns
    derived = text_sql_columns(conn, target)
    vectors = sorted({s.vector_column for s in slots} & set(derived))
    if vectors:
        raise SetupError(f"target {target.name!r}.text_sql reads the vector column(s)"
                         f" {', '.join(vectors)}: the text must not depend on its embedding")
    return target.text_columns + tuple(c for c in derived if c not in target.text_columns)


def _triggers_fingerprint(target: Target, slots: list[Slot], columns: tuple[str, ...]) -> str:
    """What the triggers were made from; kept as the clear function's comment.

    With text_sql, the expression and the columns it reads are part of it, so an edited
    text_sql re-creates the triggers (targets without one keep their old fingerprint).
    """
    spec: tuple[object, ...] = (TRIGGERS_VERSION, target.schema, target.table,
                                target.text_columns, sorted(s.vector_column for s in slots))
    if target.text_sql:
        spec += (target.text_sql, columns)
    return "pgreembed triggers " + hashlib.sha1(repr(spec).encode()).hexdigest()


def triggers_current(conn: psycopg.Connection, target: Target, slots: list[Slot]) -> bool:
    """True if the target's triggers exist, are enabled and were made for these columns
    and slots: re-creating them takes a lock that blocks the app's writes, for nothing."""
    function = sql.Identifier("pgreembed", f"clear_{target.name}").as_string(conn)
    row = conn.execute(
        """
        SELECT obj_description(to_regprocedure(%s || '()'), 'pg_proc'),
               (SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s)
                AND tgname = ANY(%s) AND tgenabled <> 'D')
        """, (function, sql.Identifier(target.schema, target.table).as_string(conn),
              _trigger_names(target))).fetchone()
    wanted = _triggers_fingerprint(target, slots, trigger_columns(conn, target, slots))
    return row is not None and row[0] == wanted and row[1] == len(_trigger_names(target))


def install_triggers(conn: psycopg.Connection, target: Target, slots: list[Slot]) -> None:
    """Clear every slot's vector when a text column changes; NOTIFY on inserts and updates.

    The row trigger fires only on UPDATE OF the text columns and only when one of
    them really changed, so updating unrelated columns never causes re-embedding.
    A vector the application sets in the same UPDATE is kept. With text_sql, the
    columns are those the expression reads (asked of Postgres), not only text_columns;
    they are compared as text, since some types (json) have no equality operator.
    """
    watched = trigger_columns(conn, target, slots)
    table = sql.Identifier(target.schema, target.table)
    function = sql.Identifier("pgreembed", f"clear_{target.name}")
    clears = sql.SQL("\n").join(
        sql.SQL("    IF NEW.{v} IS NOT DISTINCT FROM OLD.{v} THEN NEW.{v} := NULL; END IF;")
        .format(v=slot.vector) for slot in slots)
    conn.execute(sql.SQL(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $body$\n"
        "BEGIN\n{clears}\n    RETURN NEW;\nEND $body$"
    ).format(function=function, clears=clears))
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in watched)
    compare = ("OLD.{c}::text IS DISTINCT FROM NEW.{c}::text" if target.text_sql
               else "OLD.{c} IS DISTINCT FROM NEW.{c}")
    changed = sql.SQL(" OR ").join(
        sql.SQL(compare).format(c=sql.Identifier(c)) for c in watched)
    clear_trigger = sql.Identifier(f"pgreembed_clear_{target.name}")
    notify_trigger = sql.Identifier(f"pgreembed_notify_{target.name}")
    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(clear_trigger, table))
    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(notify_trigger, table))
    conn.execute(sql.SQL(
        "CREATE TRIGGER {name} BEFORE UPDATE OF {columns} ON {table} FOR EACH ROW"
        " WHEN ({changed}) EXECUTE FUNCTION {function}()"
    ).format(name=clear_trigger, columns=columns, table=table, changed=changed,
             function=function))
    conn.execute(sql.SQL(
        "CREATE TRIGGER {name} AFTER INSERT OR UPDATE OF {columns} ON {table}"
        " FOR EACH STATEMENT EXECUTE FUNCTION pgreembed.notify_changed({target})"
    ).format(name=notify_trigger, columns=columns, table=table,
             target=sql.Literal(target.name)))
    install_forget_triggers(conn, target, slots)
    conn.execute(sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(
        function, sql.Literal(_triggers_fingerprint(target, slots, watched))))


def _forget_function(conn: psycopg.Connection, function: sql.Composable,
                     statements: list[sql.Composable]) -> None:
    # SECURITY DEFINER: the app's role deletes rows of its table, but may not have any
    # privilege on our state tables; a fixed search_path makes definer rights safe.
    conn.execute(sql.SQL(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql"
        " SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$\n"
        "BEGIN\n{statements}\n    RETURN NULL;\nEND $body$"
    ).format(function=function, statements=sql.SQL("\n").join(statements)))


def install_forget_triggers(conn: psycopg.Connection, target: Target, slots: list[Slot]
                            ) -> None:
    """Delete every slot's state row of a row the app deletes, and all of them on TRUNCATE.

    Without this, state rows of deleted rows live forever: they are dead weight
    for every query of the state table and, after an in-place model change, look
    like outdated rows. A row trigger (like an ON DELETE CASCADE foreign key, which
    we cannot use: it would make the app's TRUNCATE fail and a worker's failure
    record of a just-deleted row a constraint error) costs one index probe per
    slot and deleted row. The TRUNCATE trigger DELETEs rather than TRUNCATEs: a
    TRUNCATE would take ACCESS EXCLUSIVE locks on tables the workers and the
    scheduler use, inside the app's transaction; the state rows are narrow, and
    re-embedding a reloaded table costs far more. Rows deleted while the triggers
    were off (or before this version) are removed by `pgreembed.orphans`.
    """
    table = sql.Identifier(target.schema, target.table)
    forget_row = sql.Identifier("pgreembed", f"forget_{target.name}")
    forget_all = sql.Identifier("pgreembed", f"forget_all_{target.name}")
    _forget_function(conn, forget_row, [
        sql.SQL("    DELETE FROM {state} WHERE pgr_pk = OLD.{pk};").format(
            state=slot.state_table, pk=slot.pk) for slot in slots])
    _forget_function(conn, forget_all, [
        sql.SQL("    DELETE FROM {state};").format(state=slot.state_table) for slot in slots])
    delete_trigger = sql.Identifier(f"pgreembed_forget_{target.name}")
    truncate_trigger = sql.Identifier(f"pgreembed_forget_all_{target.name}")
    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(delete_trigger, table))
    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(truncate_trigger, table))
    conn.execute(sql.SQL(
        "CREATE TRIGGER {name} AFTER DELETE ON {table} FOR EACH ROW EXECUTE FUNCTION"
        " {function}()").format(name=delete_trigger, table=table, function=forget_row))
    conn.execute(sql.SQL(
        "CREATE TRIGGER {name} AFTER TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION"
        " {function}()").format(name=truncate_trigger, table=table, function=forget_all))


def drop_triggers(conn: psycopg.Connection, target: Target) -> None:
    table = sql.Identifier(target.schema, target.table)
    for name in _trigger_names(target):
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name),
                                                                       table))


def init_target(dsn: str, target: Target, policy: LockPolicy | None = None) -> Slot:
    """Create or update everything a target needs. Safe to run again at any time.

    It runs at every scheduler start (and in init containers), so its DDL on the app's
    table goes through table_lock (short lock attempts, retried, blockers named), and
    triggers that are already as wanted are left alone (no lock at all).
    """
    from pgreembed.db import connect

    with connect(dsn, vector=False) as conn:
        ensure_pgvector(conn)
        conn.commit()
    table = sql.Identifier(target.schema, target.table)
    # Mostly trigger changes (SHARE ROW EXCLUSIVE); ADD COLUMN only on the first init.
    slot, slots, adopted = run_locked(dsn, table, "init",
                                      lambda conn: _init_in_transaction(conn, target), policy,
                                      mode=SHARE_ROW_EXCLUSIVE)
    if adopted:
        log.info("target %s: %d existing vectors adopted as %s", target.name, adopted,
                 target.model_key)
    with connect(dsn, autocommit=True, vector=False) as conn:
        for each in slots:
            ensure_pending_index(conn, each)
            # Without statistics (a column just added) the planner guesses 0.5% NULL vectors
            # and hashes the whole backlog for every page of pending keys (100x slower at 80k).
            conn.execute(sql.SQL("ANALYZE {} ({})").format(each.table, each.vector))
    return slot


def _init_in_transaction(conn: psycopg.Connection, target: Target
                         ) -> tuple[Slot, list[Slot], int]:
    from pgreembed.batch_api import DDL as BATCH_DDL

    # One initialiser at a time (two pods starting together must not race the DDL).
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('pgreembed.init'))")
    conn.execute(REGISTRY_DDL)
    conn.execute(BATCH_DDL)
    _check_table(conn, target)
    registered = [s for s in load_slots(conn, target) if s.role == "live"]
    dimensions = registered[0].dimensions if registered else target.dimensions
    added = ensure_vector_column(conn, target, target.vector_column, dimensions)
    first_init = not registered
    slot = register_live_slot(conn, target)
    if clear_misconfigured(conn, target):
        log.warning("target %s: cleared the misconfigured mark; its batches are dispatched"
                    " again", target.name)
    slots = load_slots(conn, target)
    for each in slots:
        create_state_table(conn, each)
    # Once, when the target is first set up (later inits must not scan the table), and
    # only if the column was there before (a column added just now holds no vector).
    adopted = adopt_existing_vectors(conn, slot) if first_init and not added else 0
    if not target.trigger:
        drop_triggers(conn, target)
    elif not triggers_current(conn, target, slots):
        install_triggers(conn, target, slots)
    return slot, slots, adopted
