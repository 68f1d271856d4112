"""A chunked target's tables and the parent's triggers (created by `init`).

- the chunk table, pgai's layout: embedding_uuid uuid primary key, the parent's key column
  (same name and type), chunk_seq int, chunk text (exactly the text embedded), and the
  target's vector column, NULL while pending (added by the ordinary init of the chunk
  table as a target table);
- `pgreembed.chunk_dirty_<target>`: parents whose chunk set must be made again;
- on the parent: a row is marked dirty when inserted, or when a text or template column
  changes (never for other columns); a key update moves its chunks; DELETE and TRUNCATE
  remove the chunks set-based (statement-level triggers over transition tables), so no
  foreign key is needed and the app's TRUNCATE keeps working.
"""

from __future__ import annotations

import dataclasses
import hashlib

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.config.chunking import CHUNK_KEY, CHUNK_TEXT, Chunking, Parent
from pgreembed.errors import SetupError
from pgreembed.store import catalog, chunk_settings
from pgreembed.store.slots import NOTIFY_CHANNEL, SCHEMA, app_table, primary_key_of
from pgreembed.store.triggers import text_sql_columns

# Bump when the parent's triggers change: older ones are then replaced.
# 2: deletes under REPEATABLE READ leave gone marks; 3: marks under REPEATABLE READ never
# fail on a mark committed after the snapshot; 4: NOTIFY only for a new, lone mark.
CHUNK_TRIGGERS_VERSION = 4


def parent_of(target: Target) -> Parent:
    if target.parent is None:
        raise SetupError(f"target {target.name!r} is not chunked")
    parent: Parent = target.parent
    return parent


def parent_target(target: Target) -> Target:
    """The parent table as a plain Target (its key, text expression, columns)."""
    parent = parent_of(target)
    return dataclasses.replace(target, schema=parent.schema, table=parent.table,
                               text_columns=parent.text_columns, text_sql=parent.text_sql,
                               primary_key=parent.primary_key, parent=None)


def dirty_table(target: Target) -> sql.Identifier:
    return sql.Identifier(SCHEMA, f"chunk_dirty_{target.name}")


def gone_table(target: Target) -> sql.Identifier:
    """Keys of parents deleted by a transaction whose snapshot may not see every chunk
    (REPEATABLE READ or SERIALIZABLE); NULL: the whole table was truncated. The chunk
    stage removes what is left of them (store.chunk_sets.sweep_gone)."""
    return sql.Identifier(SCHEMA, f"chunk_gone_{target.name}")


def parent_key(conn: psycopg.Connection, target: Target) -> tuple[str, str]:
    """(column, type) of the parent's key: what the chunk table's rows point to."""
    return primary_key_of(conn, parent_target(target))


def watched_columns(conn: psycopg.Connection, target: Target, also: tuple[str, ...] = ()
                    ) -> list[str]:
    """The parent's columns whose change changes its chunks: text and template columns."""
    parent = parent_of(target)
    of_parent = parent_target(target)
    texts = text_sql_columns(conn, of_parent) if parent.text_sql else parent.text_columns
    # The set keeps the settings it was made with until a re-chunk migration swaps it:
    # the columns of their template too (store.chunk_settings).
    made = chunk_settings.recorded(conn, dirty_table(target))
    made_columns = made.template_columns if made is not None else ()
    return list(dict.fromkeys([*texts, *parent.chunking.template_columns, *made_columns,
                               *also]))


def check_parent(conn: psycopg.Connection, target: Target) -> None:
    """The parent exists, has every column the text and the template name, and none the
    view (if it is still to be made) would repeat."""
    parent = parent_of(target)
    relation = app_table(parent_target(target)).as_string(conn)
    found = conn.execute("SELECT to_regclass(%s)", (relation,)).fetchone()
    if found is None or found[0] is None:
        raise SetupError(f"target {target.name!r}: table {parent.schema}.{parent.table}"
                         " does not exist")
    for kind, names in (("text column", parent.text_columns),
                        ("template column", parent.chunking.template_columns)):
        for name in names:
            if catalog.column(conn, str(found[0]), name) is None:
                raise SetupError(f"target {target.name!r}: {kind} {name!r} is not a column"
                                 f" of {parent.schema}.{parent.table}")
    # pgai's view takes the chunk columns, then p.*: a parent column of the same name
    # would fail CREATE VIEW after the chunk table is made; refuse before anything is.
    if parent.view is None or conn.execute("SELECT to_regclass(%s)", (sql.Identifier(
            parent.schema, parent.view).as_string(conn),)).fetchone() != (None,):
        return
    for name in (CHUNK_KEY, "chunk_seq", CHUNK_TEXT, target.vector_column):
        if catalog.column(conn, str(found[0]), name) is not None:
            raise SetupError(f"target {target.name!r}: view {parent.view} would have column"
                             f" {name!r} twice ({parent.schema}.{parent.table} has one):"
                             " rename it, or drop `view` from [target.destination]")


def ensure_chunk_table(conn: psycopg.Connection, target: Target) -> bool:
    """Create the chunk table and the dirty table if missing (True: created now); refuse a
    chunk table of another shape."""
    key, key_type = parent_key(conn, target)
    table = app_table(target)
    exists = conn.execute("SELECT to_regclass(%s)", (table.as_string(conn),)).fetchone()
    conn.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {dirty} (pgr_pk {type} PRIMARY KEY,"
        " pgr_marked_at timestamptz NOT NULL DEFAULT now())").format(
        dirty=dirty_table(target), type=sql.SQL(key_type)))
    # The stage takes the oldest marks first: without this index every batch of 100
    # sorted the whole dirty table (0.6 s a batch with 300,000 parents to chunk).
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {name} ON {dirty}"
                         " (pgr_marked_at, pgr_pk)").format(
        name=sql.Identifier(f"chunk_dirty_{target.name}_order"), dirty=dirty_table(target)))
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {gone} (id bigserial PRIMARY KEY,"
                         " pgr_pk {type})").format(gone=gone_table(target),
                                                   type=sql.SQL(key_type)))
    if exists is not None and exists[0] is not None:
        _check_shape(conn, target, str(exists[0]), key, key_type)
        return False
    conn.execute(sql.SQL(
        "CREATE TABLE {table} ({uuid} uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
        " {key} {type} NOT NULL, chunk_seq integer NOT NULL, {chunk} text NOT NULL,"
        " {vector} {vector_type}, UNIQUE ({key}, chunk_seq))").format(
        table=table, uuid=sql.Identifier(CHUNK_KEY), key=sql.Identifier(key),
        type=sql.SQL(key_type), chunk=sql.Identifier(CHUNK_TEXT),
        vector=sql.Identifier(target.vector_column),
        vector_type=sql.SQL(f"{target.storage_type}({int(target.dimensions)})")))
    return True


def ensure_view(conn: psycopg.Connection, target: Target) -> bool:
    """pgai's view if configured and missing (True: created): the chunk table's columns
    but the key, then every column of the parent. A swap keeps it on the live column like
    any app view (migrations.rebind); it is never replaced here once it exists."""
    parent = parent_of(target)
    if parent.view is None:
        return False
    name = sql.Identifier(parent.schema, parent.view)
    found = conn.execute("SELECT to_regclass(%s)", (name.as_string(conn),)).fetchone()
    if found is not None and found[0] is not None:
        return False
    key, _ = parent_key(conn, target)
    conn.execute(sql.SQL(
        "CREATE VIEW {view} AS SELECT c.{uuid}, c.chunk_seq, c.{chunk}, c.{vector}, p.*"
        " FROM {chunks} c JOIN {parent} p ON p.{key} = c.{key}").format(
        view=name, uuid=sql.Identifier(CHUNK_KEY), chunk=sql.Identifier(CHUNK_TEXT),
        vector=sql.Identifier(target.vector_column), chunks=app_table(target),
        parent=app_table(parent_target(target)), key=sql.Identifier(key)))
    return True


def chunking_key(target: Target) -> str:
    """What the chunk sets are made of: the splitter settings, template and text."""
    parent = parent_of(target)
    blob = "|".join([parent.chunking.key, *parent.text_columns, parent.text_sql or ""])
    return f"pgreembed chunking {hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def mark_all_unless_current(conn: psycopg.Connection, target: Target) -> tuple[int, bool]:
    """Mark every parent dirty unless its chunk sets were made with the current settings:
    on the first init, and after a change of the text columns (the stage then re-chunks
    in place; matching keeps each unchanged chunk with its vectors). The key they were
    made with, and the chunking settings, are the dirty table's comment, set in the same
    transaction as the marks (store.chunk_settings). A change of [target.chunking] alone
    marks nothing: the set keeps its recorded settings until a re-chunk migration
    (`migrate start --rechunk`) replaces it side by side; see `chunking_changed`.
    Run after the triggers are committed: a row is then either seen here or marked by the
    insert trigger. Returns (rows marked, first time)."""
    key, _ = parent_key(conn, target)
    dirty = dirty_table(target)
    made_with, settings = chunk_settings.parse(chunk_settings.read_comment(conn, dirty))
    chunking = parent_of(target).chunking
    if settings is not None and settings != chunking:
        target = chunk_settings.with_chunking(target, settings)  # kept until a migration
        chunking = settings
    wanted = chunking_key(target)
    if made_with == wanted:
        if settings is None:  # recorded before the settings were: add them
            conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
                dirty, sql.Literal(chunk_settings.comment(wanted, chunking))))
        return 0, False
    marked = conn.execute(sql.SQL(
        "INSERT INTO {dirty} (pgr_pk) SELECT {key} FROM {parent} ON CONFLICT DO NOTHING"
    ).format(dirty=dirty, key=sql.Identifier(key),
             parent=app_table(parent_target(target)))).rowcount
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
        dirty, sql.Literal(chunk_settings.comment(wanted, chunking))))
    return marked, made_with is None


def chunking_changed(conn: psycopg.Connection, target: Target) -> Chunking | None:
    """The settings the live chunk set was made with, when the config asks for others
    (None: they agree, or none are recorded)."""
    made = chunk_settings.recorded(conn, dirty_table(target))
    return made if made is not None and made != parent_of(target).chunking else None


def _check_shape(conn: psycopg.Connection, target: Target, relation: str, key: str,
                 key_type: str) -> None:
    wanted = {CHUNK_KEY: "uuid", key: key_type, "chunk_seq": "integer", CHUNK_TEXT: "text"}
    for name, kind in wanted.items():
        found = catalog.column(conn, relation, name)
        if found is None or found.formatted != kind:
            raise SetupError(
                f"target {target.name!r}: {target.schema}.{target.table} exists but its"
                f" column {name!r} is {found.formatted if found else 'missing'}, expected"
                f" {kind} (a chunk table: embedding_uuid, the parent's key, chunk_seq, chunk)")


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
    key, _ = parent_key(conn, target)
    _, function = _names(target)["edit"]
    found = conn.execute(
        "SELECT obj_description(to_regprocedure(%s), 'pg_proc')",
        (sql.SQL("{}()").format(function).as_string(conn),)).fetchone()
    current = found is not None and found[0] == _fingerprint(
        conn, target, key, watched_columns(conn, target))
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


def install_chunk_triggers(conn: psycopg.Connection, target: Target,
                           also_watch: tuple[str, ...] = ()) -> None:
    """(Re)create the parent's four triggers, in the caller's transaction (run_locked).
    `also_watch`: more parent columns whose change marks the row (a re-chunk migration's
    second set watches the template columns of both settings)."""
    key, _ = parent_key(conn, target)
    watched = watched_columns(conn, target, also_watch)
    parent = app_table(parent_target(target))
    names = _names(target)
    ids = {"chunks": app_table(target), "dirty": dirty_table(target),
           "key": sql.Identifier(key), "channel": sql.Literal(NOTIFY_CHANNEL),
           "target": sql.Literal(target.name), "changed": _changed(watched)}
    # Notifying commits queue on one lock: only a new mark (FOUND) with none older waits.
    notify = sql.SQL("    IF FOUND AND NOT EXISTS (SELECT FROM {dirty} WHERE pgr_marked_at < now())"
                     " THEN PERFORM pg_notify({channel}, {target}); END IF;").format(**ids)
    # A snapshot older than the stage's last commit (REPEATABLE READ, SERIALIZABLE) may not
    # see chunks the stage wrote, and fails with a serialization error on rows it changed:
    # such a transaction leaves marks for the stage and skips what it cannot do itself.
    # The app's statement never fails because of pgreembed's rows.
    ids["snapshot_old"] = sql.SQL("current_setting('transaction_isolation') <> 'read committed'")
    ids["gone"] = gone_table(target)
    _function(conn, names["new"][1], sql.SQL(
        "{mark}\n{notify}").format(notify=notify, mark=_mark(ids, sql.SQL(
            "INSERT INTO {dirty} (pgr_pk) SELECT {key} FROM pgr_new ON CONFLICT DO NOTHING"
        ).format(**ids))))
    _function(conn, names["edit"][1], sql.SQL(
        "    IF OLD.{key} IS DISTINCT FROM NEW.{key} THEN\n"
        "        BEGIN\n"
        "            UPDATE {chunks} SET {key} = NEW.{key} WHERE {key} = OLD.{key};\n"
        "            DELETE FROM {dirty} WHERE pgr_pk = OLD.{key};\n"
        "        EXCEPTION WHEN serialization_failure THEN\n"
        "            INSERT INTO {gone} (pgr_pk) VALUES (OLD.{key});\n"
        "            INSERT INTO {dirty} (pgr_pk) VALUES (NEW.{key}) ON CONFLICT DO NOTHING;\n"
        "        END;\n"
        "    END IF;\n"
        "    IF {changed} THEN\n"
        "{mark}\n"
        "    {notify}\n"
        "    END IF;").format(notify=notify, mark=_mark(ids, sql.SQL(
            "INSERT INTO {dirty} (pgr_pk) VALUES (NEW.{key}) ON CONFLICT DO NOTHING").format(
            **ids)), **ids))
    _function(conn, names["gone"][1], sql.SQL(
        "    IF {snapshot_old} THEN\n"
        "        INSERT INTO {gone} (pgr_pk) SELECT {key} FROM pgr_old;\n"
        "    END IF;\n"
        "    BEGIN\n"
        "        DELETE FROM {chunks} c USING pgr_old o WHERE c.{key} = o.{key};\n"
        "        DELETE FROM {dirty} d USING pgr_old o WHERE d.pgr_pk = o.{key};\n"
        "    EXCEPTION WHEN serialization_failure THEN\n"
        "        NULL;  -- rows the stage changed since this snapshot: the marks cover them\n"
        "    END;").format(**ids))
    # DELETE, not TRUNCATE: a TRUNCATE would take ACCESS EXCLUSIVE on tables the workers
    # use, inside the app's transaction (as store.triggers' forget_all).
    _function(conn, names["gone_all"][1], sql.SQL(
        "    IF {snapshot_old} THEN\n"
        "        INSERT INTO {gone} (pgr_pk) VALUES (NULL);\n"
        "    END IF;\n"
        "    BEGIN\n"
        "        DELETE FROM {chunks};\n        DELETE FROM {dirty};\n"
        "    EXCEPTION WHEN serialization_failure THEN\n"
        "        NULL;\n"
        "    END;").format(**ids))
    for trigger, _ in names.values():
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(trigger, parent))
    each = {"parent": parent, "key": ids["key"], "changed": ids["changed"]}
    statements = {
        "new": "AFTER INSERT ON {parent} REFERENCING NEW TABLE AS pgr_new FOR EACH STATEMENT",
        "edit": "AFTER UPDATE OF {columns} ON {parent} FOR EACH ROW WHEN"
                " (OLD.{key} IS DISTINCT FROM NEW.{key} OR {changed})",
        "gone": "AFTER DELETE ON {parent} REFERENCING OLD TABLE AS pgr_old FOR EACH STATEMENT",
        "gone_all": "AFTER TRUNCATE ON {parent} FOR EACH STATEMENT",
    }
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in dict.fromkeys([key, *watched]))
    for kind, (trigger, function) in names.items():
        conn.execute(sql.SQL("CREATE TRIGGER {trigger} " + statements[kind]
                             + " EXECUTE FUNCTION {function}()").format(
            trigger=trigger, function=function, columns=columns, **each))
    conn.execute(sql.SQL("COMMENT ON FUNCTION {}() IS {}").format(
        names["edit"][1], sql.Literal(_fingerprint(conn, target, key, watched))))


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
