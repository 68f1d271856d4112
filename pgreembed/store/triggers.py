"""The app table's triggers: clear the vector when a *text* column changes (not when
unrelated columns change), NOTIFY the scheduler, forget deleted rows' state."""

from __future__ import annotations

import hashlib

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.errors import SetupError
from pgreembed.store.slots import (
    Slot,
    app_table,
    text_expression,
)
from pgreembed.store.trusted_sql import NO_PARAMS

# Bump when the triggers install_triggers creates change: older ones are then replaced.
# 3: the clear function pins its search_path (pgvector's schema).
TRIGGERS_VERSION = 3


def vector_schema(conn: psycopg.Connection) -> str:
    """The schema pgvector was created in (`public`, or e.g. Supabase's `extensions`)."""
    row = conn.execute("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n"
                       " ON n.oid = e.extnamespace WHERE e.extname = 'vector'").fetchone()
    if row is None:
        raise SetupError("pgvector is not enabled in this database: CREATE EXTENSION vector")
    return str(row[0])


def pinned_search_path(conn: psycopg.Connection) -> sql.Composable:
    """The clear function's own search_path: it compares vectors (the `=` of pgvector's
    schema), and runs in the app's sessions, whose search_path may not name that schema
    (then every text edit of the app failed: "operator does not exist: vector = vector").
    pg_catalog first, so nothing in the extension's schema shadows a built-in."""
    return sql.SQL("SET search_path = pg_catalog, {}, pg_temp").format(
        sql.Identifier(vector_schema(conn)))


def on_table(target: Target, slots: list[Slot]) -> list[Slot]:
    """The slots on `target`'s own table (a re-chunk's new chunk set is another table,
    whose rows these triggers never see)."""
    return [s for s in slots if s.target.table == target.table]


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
    table = app_table(target)
    probe = sql.Identifier(f"pgreembed_text_sql_{target.name}")
    columns: list[tuple[int, str | None]] = []
    with conn.transaction():
        try:
            conn.execute(sql.SQL("CREATE TEMPORARY VIEW {} AS SELECT ({}) FROM {}").format(
                probe, text_expression(target), table), NO_PARAMS)
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


def _triggers_fingerprint(target: Target, slots: list[Slot], columns: tuple[str, ...],
                          search_path: str) -> str:
    """What the triggers were made from; kept as the clear function's comment.

    With text_sql, the expression and the columns it reads are part of it, so an edited
    text_sql re-creates the triggers (targets without one keep their old fingerprint).
    """
    spec: tuple[object, ...] = (TRIGGERS_VERSION, target.schema, target.table,
                                target.text_columns, sorted(s.vector_column for s in slots),
                                search_path)
    if target.text_sql:
        spec += (target.text_sql, columns)
    return "pgreembed triggers " + hashlib.sha1(repr(spec).encode()).hexdigest()


def triggers_current(conn: psycopg.Connection, target: Target, slots: list[Slot]) -> bool:
    """True if the target's triggers exist, are enabled and were made for these columns
    and slots: re-creating them takes a lock that blocks the app's writes, for nothing."""
    slots = on_table(target, slots)
    function = sql.Identifier("pgreembed", f"clear_{target.name}").as_string(conn)
    row = conn.execute(
        """
        SELECT obj_description(to_regprocedure(%s || '()'), 'pg_proc'),
               (SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s)
                AND tgname = ANY(%s) AND tgenabled <> 'D')
        """, (function, app_table(target).as_string(conn),
              _trigger_names(target))).fetchone()
    wanted = _triggers_fingerprint(target, slots, trigger_columns(conn, target, slots),
                                   pinned_search_path(conn).as_string(conn))
    return row is not None and row[0] == wanted and row[1] == len(_trigger_names(target))


def install_triggers(conn: psycopg.Connection, target: Target, slots: list[Slot]) -> None:
    """Clear every slot's vector when a text column changes; NOTIFY on inserts and updates.

    The row trigger fires only on UPDATE OF the text columns and only when one of
    them really changed, so updating unrelated columns never causes re-embedding.
    A vector the application sets in the same UPDATE is kept. With text_sql, the
    columns are those the expression reads (asked of Postgres), not only text_columns;
    they are compared as text, since some types (json) have no equality operator.
    """
    slots = on_table(target, slots)
    watched = trigger_columns(conn, target, slots)
    table = app_table(target)
    function = sql.Identifier("pgreembed", f"clear_{target.name}")
    clears = sql.SQL("\n").join(
        sql.SQL("    IF NEW.{v} IS NOT DISTINCT FROM OLD.{v} THEN NEW.{v} := NULL; END IF;")
        .format(v=slot.vector) for slot in slots)
    search_path = pinned_search_path(conn)
    conn.execute(sql.SQL(
        "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql {path}"
        " AS $body$\nBEGIN\n{clears}\n    RETURN NEW;\nEND $body$"
    ).format(function=function, path=search_path, clears=clears))
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
        function, sql.Literal(_triggers_fingerprint(target, slots, watched,
                                                    search_path.as_string(conn)))))


def recompile_clear_function(conn: psycopg.Connection, target: Target) -> None:
    """Make every session compile the clear trigger's function again.

    PL/pgSQL caches each expression's plan per session, typed by the columns' types then:
    after a swap exchanges a `vector` and a `halfvec` column, every app session that ran
    the trigger before would fail its next text update with "type of parameter N
    (halfvec) does not match that when preparing the plan (vector)". Any change of the
    function's catalog row (here its COST, to the default) makes sessions recompile it.
    """
    function = sql.Identifier("pgreembed", f"clear_{target.name}")
    found = conn.execute("SELECT to_regprocedure(%s)",
                         (sql.SQL("{}()").format(function).as_string(conn),)).fetchone()
    if found is not None and found[0] is not None:
        conn.execute(sql.SQL("ALTER FUNCTION {}() COST 100").format(function))


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
    slots = on_table(target, slots)
    table = app_table(target)
    forget_row = sql.Identifier("pgreembed", f"forget_{target.name}")
    forget_all = sql.Identifier("pgreembed", f"forget_all_{target.name}")
    # A chunk table (ours, never partitioned) loses thousands of rows per statement (a
    # parent's delete): there one set-based delete per slot over the transition table.
    per_statement = target.parent is not None
    _forget_function(conn, forget_row, [
        sql.SQL("    DELETE FROM {state} s USING pgr_old o WHERE s.pgr_pk = o.{pk};"
                if per_statement else "    DELETE FROM {state} WHERE pgr_pk = OLD.{pk};"
                ).format(state=slot.state_table, pk=slot.pk) for slot in slots])
    _forget_function(conn, forget_all, [
        sql.SQL("    DELETE FROM {state};").format(state=slot.state_table) for slot in slots])
    delete_trigger = sql.Identifier(f"pgreembed_forget_{target.name}")
    truncate_trigger = sql.Identifier(f"pgreembed_forget_all_{target.name}")
    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(delete_trigger, table))
    conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(truncate_trigger, table))
    conn.execute(sql.SQL(
        "CREATE TRIGGER {name} AFTER DELETE ON {table} " + (
            "REFERENCING OLD TABLE AS pgr_old FOR EACH STATEMENT" if per_statement
            else "FOR EACH ROW") + " EXECUTE FUNCTION {function}()").format(
        name=delete_trigger, table=table, function=forget_row))
    conn.execute(sql.SQL(
        "CREATE TRIGGER {name} AFTER TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION"
        " {function}()").format(name=truncate_trigger, table=table, function=forget_all))


def drop_triggers(conn: psycopg.Connection, target: Target) -> None:
    table = app_table(target)
    for name in _trigger_names(target):
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(name),
                                                                       table))
