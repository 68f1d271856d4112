"""A chunked target's tables (created by `init`).

- the chunk table, pgai's layout: embedding_uuid uuid primary key, the parent's key
  columns (same names and types; store.parent_keys), chunk_seq int, chunk text (exactly
  the text embedded), and the target's vector column, NULL while pending (added by the
  ordinary init of the chunk table as a target table);
- `pgreembed.chunk_dirty_<target>`: parents whose chunk set must be made again;
- the parent's triggers: store.chunk_triggers.
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
from pgreembed.store.parent_keys import ParentKey
from pgreembed.store.slots import SCHEMA, app_table, primary_key_of
from pgreembed.store.triggers import text_sql_columns


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


def parent_key(conn: psycopg.Connection, target: Target) -> ParentKey:
    """The parent's key, what the chunk table's rows point to: the configured
    `primary_key`, else every column of the primary key in its order (pgai allows
    composite keys; ordinary targets still need one column, slots.primary_key_of)."""
    of_parent = parent_target(target)
    if of_parent.primary_key:
        column, kind = primary_key_of(conn, of_parent)
        return ParentKey((column,), (kind,))
    rows = catalog.primary_key(conn, catalog.regclass(conn, app_table(of_parent)))
    if not rows:
        raise SetupError(f"target {target.name!r}: {of_parent.schema}.{of_parent.table}"
                         " needs a primary key (or set primary_key to a unique, non-null"
                         " column)")
    return ParentKey(tuple(r[0] for r in rows), tuple(r[1] for r in rows))


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
    key = parent_key(conn, target)
    table = app_table(target)
    exists = conn.execute("SELECT to_regclass(%s)", (table.as_string(conn),)).fetchone()
    marks = [(sql.Identifier(m), sql.SQL(t)) for m, t in zip(key.marks, key.types, strict=True)]
    conn.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {dirty} ({columns}, PRIMARY KEY ({marks}),"
        " pgr_marked_at timestamptz NOT NULL DEFAULT now())").format(
        dirty=dirty_table(target), marks=key.cols(marks=True),
        columns=sql.SQL(", ").join(sql.SQL("{} {} NOT NULL").format(*m) for m in marks)))
    # The stage takes the oldest marks first: without this index every batch of 100
    # sorted the whole dirty table (0.6 s a batch with 300,000 parents to chunk).
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {name} ON {dirty}"
                         " (pgr_marked_at, {marks})").format(
        name=sql.Identifier(f"chunk_dirty_{target.name}_order"), dirty=dirty_table(target),
        marks=key.cols(marks=True)))
    # A gone mark with NULL keys: the whole parent was truncated.
    conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {gone} (id bigserial PRIMARY KEY,"
                         " {columns})").format(gone=gone_table(target), columns=sql.SQL(
                             ", ").join(sql.SQL("{} {}").format(*m) for m in marks)))
    if exists is not None and exists[0] is not None:
        _check_shape(conn, target, str(exists[0]), key)
        return False
    conn.execute(sql.SQL(
        "CREATE TABLE {table} ({uuid} uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
        " {keys}, chunk_seq integer NOT NULL, {chunk} text NOT NULL,"
        " {vector} {vector_type}, UNIQUE ({key}, chunk_seq))").format(
        table=table, uuid=sql.Identifier(CHUNK_KEY), key=key.cols(),
        keys=sql.SQL(", ").join(sql.SQL("{} {} NOT NULL").format(sql.Identifier(c), sql.SQL(t))
                                for c, t in zip(key.columns, key.types, strict=True)),
        chunk=sql.Identifier(CHUNK_TEXT), vector=sql.Identifier(target.vector_column),
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
    conn.execute(sql.SQL(
        "CREATE VIEW {view} AS SELECT c.{uuid}, c.chunk_seq, c.{chunk}, c.{vector}, p.*"
        " FROM {chunks} c JOIN {parent} p ON {joined}").format(
        view=name, uuid=sql.Identifier(CHUNK_KEY), chunk=sql.Identifier(CHUNK_TEXT),
        vector=sql.Identifier(target.vector_column), chunks=app_table(target),
        parent=app_table(parent_target(target)),
        joined=parent_key(conn, target).equal("p", "c")))
    return True


def share_with_parent_readers(conn: psycopg.Connection, target: Target) -> list[str]:
    """SELECT on the chunk table and the view for whoever may read the parent (its owner,
    the roles granted SELECT on it, PUBLIC), as pgai grants its chunk tables: made by
    pgreembed's role, they were readable by nobody else, so the app could not search its
    own chunks. Only grants missing on objects pgreembed's role owns; the readers given
    it."""
    parent = parent_of(target)
    readers = [str(r[0]) for r in conn.execute(
        """
        SELECT DISTINCT coalesce(r.rolname, 'PUBLIC') FROM pg_class c
        CROSS JOIN LATERAL (SELECT c.relowner AS grantee UNION
                            SELECT a.grantee FROM aclexplode(c.relacl) a
                            WHERE a.privilege_type = 'SELECT') g
        LEFT JOIN pg_roles r ON r.oid = g.grantee
        WHERE c.oid = %s::regclass
        """, (app_table(parent_target(target)).as_string(conn),))]
    objects = [app_table(target)]
    if parent.view is not None:
        objects.append(sql.Identifier(parent.schema, parent.view))
    given = []
    for obj in objects:
        name = obj.as_string(conn)
        for reader in readers:
            # has_table_privilege takes 'public' for PUBLIC's own grants.
            missing = conn.execute(
                "SELECT pg_has_role(c.relowner, 'USAGE') AND NOT has_table_privilege(%s,"
                " c.oid, 'SELECT') FROM pg_class c WHERE c.oid = to_regclass(%s)",
                ("public" if reader == "PUBLIC" else reader, name)).fetchone()
            if missing and missing[0]:
                conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(
                    obj, sql.SQL("PUBLIC") if reader == "PUBLIC" else sql.Identifier(reader)))
                given.append(reader)
    return sorted(set(given))


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
    key = parent_key(conn, target)
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
        "INSERT INTO {dirty} ({marks}) SELECT {key} FROM {parent} ON CONFLICT DO NOTHING"
    ).format(dirty=dirty, marks=key.cols(marks=True), key=key.cols(),
             parent=app_table(parent_target(target)))).rowcount
    conn.execute(sql.SQL("COMMENT ON TABLE {} IS {}").format(
        dirty, sql.Literal(chunk_settings.comment(wanted, chunking))))
    return marked, made_with is None


def chunking_changed(conn: psycopg.Connection, target: Target) -> Chunking | None:
    """The settings the live chunk set was made with, when the config asks for others
    (None: they agree, or none are recorded)."""
    made = chunk_settings.recorded(conn, dirty_table(target))
    return made if made is not None and made != parent_of(target).chunking else None


def _check_shape(conn: psycopg.Connection, target: Target, relation: str, key: ParentKey
                 ) -> None:
    wanted = {CHUNK_KEY: "uuid", **dict(zip(key.columns, key.types, strict=True)),
              "chunk_seq": "integer", CHUNK_TEXT: "text"}
    for name, kind in wanted.items():
        found = catalog.column(conn, relation, name)
        if found is None or found.formatted != kind:
            raise SetupError(
                f"target {target.name!r}: {target.schema}.{target.table} exists but its"
                f" column {name!r} is {found.formatted if found else 'missing'}, expected"
                f" {kind} (a chunk table: embedding_uuid, the parent's key columns, chunk_seq,"
                " chunk)")
