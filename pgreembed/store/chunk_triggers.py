"""The parent's triggers of a chunked target (installed by `init`).

A row is marked dirty when inserted, or when a text or template column changes (never
for other columns); a key update moves its chunks; DELETE and TRUNCATE remove the chunks
set-based (statement-level triggers over transition tables), so no foreign key is needed
and the app's TRUNCATE keeps working. A composite parent key is compared and joined on
every key column (store.parent_keys); a single-column key's triggers are as before.
"""

from __future__ import annotations

import hashlib

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.store.chunks import (
    dirty_table,
    gone_table,
    parent_key,
    parent_target,
    watched_columns,
)
from pgreembed.store.parent_keys import ParentKey
from pgreembed.store.slots import NOTIFY_CHANNEL, SCHEMA, app_table

# Bump when the parent's triggers change: older ones are then replaced.
# 2: deletes under REPEATABLE READ leave gone marks and never fail on the stage's rows.
# 3: marks under REPEATABLE READ never fail on a mark committed after the snapshot.
CHUNK_TRIGGERS_VERSION = 3


def _changed(columns: list[str]) -> sql.Composable:
    # Compared as text: template columns may be of types without `=` (json, point).
    return sql.SQL(" OR ").join(
        sql.SQL("OLD.{c}::text IS DISTINCT FROM NEW.{c}::text").format(c=sql.Identifier(c))
        for c in columns)


def _function(conn: psycopg.Connection, name: sql.Identifier, body: sql.Composable) -> None:
    # SECURITY DEFINER: the app's role changes its own table but may have no privilege on
    # the chunk and dirty tables; a fixed search_path (every name qualified) keeps it safe.
    conn.execute(sql.SQL(
        "CREATE OR REPLACE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql"
        " SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $body$\nBEGIN\n{body}\n"
        "    RETURN NULL;\nEND $body$").format(name=name, body=body))


def _names(target: Target) -> dict[str, tuple[sql.Identifier, sql.Identifier]]:
    """kind -> (trigger, function) on the parent."""
    return {kind: (sql.Identifier(f"pgreembed_chunk_{kind}_{target.name}"),
                   sql.Identifier(SCHEMA, f"chunk_{kind}_{target.name}"))
            for kind in ("new", "edit", "gone", "gone_all")}


def _fingerprint(conn: psycopg.Connection, target: Target, key: str, watched: list[str]
                 ) -> str:
    blob = "|".join([str(CHUNK_TRIGGERS_VERSION), app_table(target).as_string(conn), key,
                     *watched])
    return f"pgreembed chunk triggers {hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def chunk_triggers_current(conn: psycopg.Connection, target: Target) -> bool:
    """Whether the parent's triggers are as install_chunk_triggers would make them (then
    init takes no lock on the parent at all)."""
    _, function = _names(target)["edit"]
    found = conn.execute(
        "SELECT obj_description(to_regprocedure(%s), 'pg_proc')",
        (sql.SQL("{}()").format(function).as_string(conn),)).fetchone()
    current = found is not None and found[0] == _fingerprint(
        conn, target, parent_key(conn, target).name, watched_columns(conn, target))
    if not current:
        return False
    parent = app_table(parent_target(target)).as_string(conn)
    count = conn.execute(
        "SELECT count(*) FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = ANY(%s)",
        (parent, [t.as_string(conn).strip('"') for t, _ in _names(target).values()])
    ).fetchone()
    return count is not None and count[0] == len(_names(target))


def _mark(ids: dict[str, sql.Composable], insert: sql.Composable) -> sql.Composable:
    """A dirty mark. Under REPEATABLE READ or SERIALIZABLE, ON CONFLICT DO NOTHING fails
    with a serialization error when the row it meets was committed after the snapshot (a
    mark `init` or `migrate start --rechunk` made, or another edit's): that mark stands for
    this parent too, and the stage cannot remove it while this transaction holds the row
    (it skips parents locked by the app), so the error is dropped. Read committed takes
    no subtransaction."""
    return sql.SQL(
        "    IF {snapshot_old} THEN\n"
        "        BEGIN\n"
        "            {insert};\n"
        "        EXCEPTION WHEN serialization_failure THEN\n"
        "            NULL;  -- a mark for the row is there (committed after this snapshot)\n"
        "        END;\n"
        "    ELSE\n"
        "        {insert};\n"
        "    END IF;").format(snapshot_old=ids["snapshot_old"], insert=insert)


def _fields(record: str, key: ParentKey) -> sql.Composable:
    """`OLD.k1, OLD.k2`: the key of a trigger's record (OLD and NEW are not quotable)."""
    return sql.SQL(", ").join(sql.SQL(record + ".{}").format(sql.Identifier(c))
                              for c in key.columns)


def _row(record: str, key: ParentKey) -> sql.Composable:
    """`OLD.k`, or `(OLD.k1, OLD.k2)` for a composite key (compared as a row)."""
    fields = _fields(record, key)
    return sql.SQL("({})").format(fields) if key.composite else fields


def _where(key: ParentKey, record: str, *, marks: bool = False) -> sql.Composable:
    """`k1 = OLD.k1 AND k2 = OLD.k2` (or the mark columns)."""
    names = key.marks if marks else key.columns
    return sql.SQL(" AND ").join(sql.SQL("{} = " + record + ".{}").format(
        sql.Identifier(n), sql.Identifier(c)) for n, c in zip(names, key.columns, strict=True))


def install_chunk_triggers(conn: psycopg.Connection, target: Target,
                           also_watch: tuple[str, ...] = ()) -> None:
    """(Re)create the parent's four triggers, in the caller's transaction (run_locked).
    `also_watch`: more parent columns whose change marks the row (a re-chunk migration's
    second set watches the template columns of both settings)."""
    key = parent_key(conn, target)
    watched = watched_columns(conn, target, also_watch)
    parent = app_table(parent_target(target))
    names = _names(target)
    ids = {"chunks": app_table(target), "dirty": dirty_table(target),
           "keys": key.cols(), "marks": key.cols(marks=True),
           "first_mark": sql.Identifier(key.marks[0]),
           "old": _fields("OLD", key), "new": _fields("NEW", key),
           "old_row": _row("OLD", key), "new_row": _row("NEW", key),
           "set_new": sql.SQL(", ").join(sql.SQL("{c} = NEW.{c}").format(c=sql.Identifier(c))
                                         for c in key.columns),
           "chunk_of_old": _where(key, "OLD"), "mark_of_old": _where(key, "OLD", marks=True),
           "chunk_in_old": key.equal("c", "o"),
           "mark_in_old": key.equal("d", "o", left_marks=True),
           "channel": sql.Literal(NOTIFY_CHANNEL),
           "target": sql.Literal(target.name), "changed": _changed(watched)}
    notify = sql.SQL("    PERFORM pg_notify({channel}, {target});").format(**ids)
    # A snapshot older than the stage's last commit (REPEATABLE READ, SERIALIZABLE) may not
    # see chunks the stage wrote, and fails with a serialization error on rows it changed:
    # such a transaction leaves marks for the stage and skips what it cannot do itself.
    # The app's statement never fails because of pgreembed's rows.
    ids["snapshot_old"] = sql.SQL("current_setting('transaction_isolation') <> 'read committed'")
    ids["gone"] = gone_table(target)
    _function(conn, names["new"][1], sql.SQL(
        "{mark}\n{notify}").format(notify=notify, mark=_mark(ids, sql.SQL(
            "INSERT INTO {dirty} ({marks}) SELECT {keys} FROM pgr_new ON CONFLICT DO NOTHING"
        ).format(**ids))))
    _function(conn, names["edit"][1], sql.SQL(
        "    IF {old_row} IS DISTINCT FROM {new_row} THEN\n"
        "        BEGIN\n"
        "            UPDATE {chunks} SET {set_new} WHERE {chunk_of_old};\n"
        "            DELETE FROM {dirty} WHERE {mark_of_old};\n"
        "        EXCEPTION WHEN serialization_failure THEN\n"
        "            INSERT INTO {gone} ({marks}) VALUES ({old});\n"
        "            INSERT INTO {dirty} ({marks}) VALUES ({new}) ON CONFLICT DO NOTHING;\n"
        "        END;\n"
        "    END IF;\n"
        "    IF {changed} THEN\n"
        "{mark}\n"
        "    {notify}\n"
        "    END IF;").format(notify=notify, mark=_mark(ids, sql.SQL(
            "INSERT INTO {dirty} ({marks}) VALUES ({new}) ON CONFLICT DO NOTHING").format(
            **ids)), **ids))
    _function(conn, names["gone"][1], sql.SQL(
        "    IF {snapshot_old} THEN\n"
        "        INSERT INTO {gone} ({marks}) SELECT {keys} FROM pgr_old;\n"
        "    END IF;\n"
        "    BEGIN\n"
        "        DELETE FROM {chunks} c USING pgr_old o WHERE {chunk_in_old};\n"
        "        DELETE FROM {dirty} d USING pgr_old o WHERE {mark_in_old};\n"
        "    EXCEPTION WHEN serialization_failure THEN\n"
        "        NULL;  -- rows the stage changed since this snapshot: the marks cover them\n"
        "    END;").format(**ids))
    # DELETE, not TRUNCATE: a TRUNCATE would take ACCESS EXCLUSIVE on tables the workers
    # use, inside the app's transaction (as store.triggers' forget_all).
    _function(conn, names["gone_all"][1], sql.SQL(
        "    IF {snapshot_old} THEN\n"
        "        INSERT INTO {gone} ({first_mark}) VALUES (NULL);\n"
        "    END IF;\n"
        "    BEGIN\n"
        "        DELETE FROM {chunks};\n        DELETE FROM {dirty};\n"
        "    EXCEPTION WHEN serialization_failure THEN\n"
        "        NULL;\n"
        "    END;").format(**ids))
    for trigger, _ in names.values():
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(trigger, parent))
    each = {"parent": parent, "old_row": ids["old_row"], "new_row": ids["new_row"],
            "changed": ids["changed"]}
    statements = {
        "new": "AFTER INSERT ON {parent} REFERENCING NEW TABLE AS pgr_new FOR EACH STATEMENT",
        "edit": "AFTER UPDATE OF {columns} ON {parent} FOR EACH ROW WHEN"
                " ({old_row} IS DISTINCT FROM {new_row} OR {changed})",
        "gone": "AFTER DELETE ON {parent} REFERENCING OLD TABLE AS pgr_old FOR EACH STATEMENT",
        "gone_all": "AFTER TRUNCATE ON {parent} FOR EACH STATEMENT",
    }
    columns = sql.SQL(", ").join(sql.Identifier(c)
                                 for c in dict.fromkeys([*key.columns, *watched]))
    for kind, (trigger, function) in names.items():
        conn.execute(sql.SQL("CREATE TRIGGER {trigger} " + statements[kind]
                             + " EXECUTE FUNCTION {function}()").format(
            trigger=trigger, function=function, columns=columns, **each))
    conn.execute(sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(
        names["edit"][1], sql.Literal(_fingerprint(conn, target, key.name, watched))))


def chunk_trigger_names(target: Target) -> list[str]:
    """The names of the parent's triggers a chunked target installs."""
    return [f"pgreembed_chunk_{kind}_{target.name}" for kind in _names(target)]


def chunk_triggers_present(conn: psycopg.Connection, target: Target) -> list[str]:
    """Which of them exist on the parent (enabled or not)."""
    parent = app_table(parent_target(target)).as_string(conn)
    return [r[0] for r in conn.execute(
        "SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = ANY(%s)",
        (parent, chunk_trigger_names(target))).fetchall()]


def set_chunk_triggers_enabled(conn: psycopg.Connection, target: Target, enabled: bool
                               ) -> None:
    """ENABLE or DISABLE the parent's triggers in one ALTER TABLE (SHARE ROW EXCLUSIVE,
    unlike DROP TRIGGER's ACCESS EXCLUSIVE); the caller holds the table-lock policy."""
    present = chunk_triggers_present(conn, target)
    if not present:
        return
    verb = sql.SQL("ENABLE" if enabled else "DISABLE")
    conn.execute(sql.SQL("ALTER TABLE {} {}").format(
        app_table(parent_target(target)), sql.SQL(", ").join(
            sql.SQL("{} TRIGGER {}").format(verb, sql.Identifier(name)) for name in present)))


def drop_chunk_triggers(conn: psycopg.Connection, target: Target) -> None:
    """Remove the parent's four triggers of `target` and their functions (a re-chunk
    migration's second set, at finalize or cancel)."""
    parent = app_table(parent_target(target))
    for trigger, function in _names(target).values():
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(trigger, parent))
        conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(function))
