"""A re-chunk migration's second chunk set: its tables, how the stage keeps it current,
and the renames that swap it live (the SQL of pgreembed.migrations.rechunk).

The new set is a chunk table `<table>__c<slot>` in the chunk table's layout, with its own
dirty and gone tables and its own triggers on the parent (a "shadow" chunked target named
`<target>__c<slot>`), so every parent edit marks both sets and the chunk stage keeps both
current, each with the settings recorded on its dirty table (store.chunk_settings). Its
vector column is a slot of the configured target (role 'next') whose registry row names
the shadow table: the scheduler and workers embed it like any slot. The swap renames the
two chunk tables (and their dirty and gone tables, indexes, the slots' table names) in
one transaction: whatever holds a name keeps holding the set that name means.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.config.chunking import CHUNK_KEY, CHUNK_TEXT, Chunking
from pgreembed.errors import MigrationError
from pgreembed.store import chunk_settings
from pgreembed.store.chunks import dirty_table, gone_table
from pgreembed.store.slots import SCHEMA, Slot, app_table, load_slots
from pgreembed.store.trusted_sql import NO_PARAMS

SWAP_SUFFIX = "__pgreembed_swap"


@dataclass(frozen=True)
class ChunkSet:
    """One chunk table the stage keeps current: `target` names it (table, dirty and gone
    tables) and splits with its recorded settings; `configured` is the target as configured
    (its slots); `copy_from`: the set whose vectors a new chunk of the same text takes."""

    target: Target
    configured: Target
    copy_from: Target | None = None


def shadow(target: Target, slot_id: int, chunking: Chunking | None = None) -> Target:
    """The second set of a re-chunk migration whose new slot is `slot_id`."""
    assert target.parent is not None
    shadowed = dataclasses.replace(target, name=f"{target.name}__c{slot_id}",
                                   table=f"{target.table}__c{slot_id}")
    return chunk_settings.with_chunking(shadowed, chunking) if chunking else shadowed


def rechunk_slot(conn: psycopg.Connection, target: Target) -> int | None:
    """The new slot of the target's open re-chunk migration (its shadow's suffix), if any."""
    row = conn.execute(
        "SELECT m.to_slot FROM pgreembed.migrations m"
        " JOIN pgreembed.slots a ON a.id = m.from_slot JOIN pgreembed.slots b ON b.id = m.to_slot"
        " WHERE m.target = %s AND m.phase IN ('filling', 'swapped', 'rolled_back')"
        " AND a.table_name <> b.table_name", (target.name,)).fetchone()
    return None if row is None else int(row[0])


def sets_of(conn: psycopg.Connection, target: Target) -> list[ChunkSet]:
    """The target's chunk sets: the one its table holds and, during a re-chunk migration,
    the other; each with the settings it was made with. None before `init`."""
    if not any(s.role == "live" for s in load_slots(conn, target)):
        return []
    made = chunk_settings.recorded(conn, dirty_table(target))
    live = chunk_settings.with_chunking(target, made) if made else target
    sets = [ChunkSet(live, target)]
    slot_id = rechunk_slot(conn, target)
    if slot_id is not None:
        other = shadow(target, slot_id)
        made = chunk_settings.recorded(conn, dirty_table(other))
        if made is not None:
            sets.append(ChunkSet(chunk_settings.with_chunking(other, made), target, live))
    return sets


def same_settings(conn: psycopg.Connection, target: Target, chunking: Chunking) -> bool:
    """Lock the set's table (ROW EXCLUSIVE: a swap cannot commit before this transaction)
    and tell whether it is still made with `chunking` (a swap renames the sets)."""
    conn.execute(sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(app_table(target)))
    made = chunk_settings.recorded(conn, dirty_table(target))
    return made is None or made == chunking


def copy_known(conn: psycopg.Connection, chunk_set: ChunkSet, limit: int = 5000) -> int:
    """Give new chunks of `chunk_set` (never embedded) the vector the other set holds for
    the same text, with their state rows, in one transaction; commits. Both sets are the
    same model (a re-chunk migration changes no model): checked under the tables' locks,
    so a vector lands only in a column of the model that made it."""
    assert chunk_set.copy_from is not None
    into_table, from_table = app_table(chunk_set.target), app_table(chunk_set.copy_from)
    try:
        for table in (from_table, into_table):  # the swap's order
            conn.execute(sql.SQL("LOCK TABLE {} IN ROW EXCLUSIVE MODE").format(table))
        slots = {s.target.table: s for s in load_slots(conn, chunk_set.configured)}
        into = slots.get(chunk_set.target.table)
        source = slots.get(chunk_set.copy_from.table)
        if into is None or source is None or (into.model_id, into.vector_type) != (
                source.model_id, source.vector_type):
            conn.rollback()
            return 0
        copied = conn.execute(sql.SQL(
            """
            WITH todo AS (
                SELECT n.{uuid} AS u, md5(coalesce(n.{chunk}, ''))::uuid AS h, n.{chunk} AS t
                FROM {into} n
                WHERE n.{vector} IS NULL
                  AND NOT EXISTS (SELECT FROM {into_state} s WHERE s.pgr_pk = n.{uuid})
                ORDER BY n.{uuid} LIMIT %(limit)s FOR UPDATE OF n SKIP LOCKED
            ), found AS (
                SELECT DISTINCT ON (t.u) t.u, t.h, l.{vector} AS vec, ls.pgr_truncated AS tr
                FROM todo t
                JOIN {from_state} ls ON ls.pgr_model_id = %(model)s AND ls.pgr_hash = t.h
                JOIN {source} l ON l.{uuid} = ls.pgr_pk AND l.{chunk} = t.t
                WHERE l.{vector} IS NOT NULL
                ORDER BY t.u
            ), written AS (
                UPDATE {into} n SET {vector} = f.vec FROM found f WHERE n.{uuid} = f.u
                RETURNING f.u, f.h, f.tr
            )
            INSERT INTO {into_state} (pgr_pk, pgr_model_id, pgr_hash, pgr_embedded_at,
                                      pgr_truncated)
            SELECT u, %(model)s, h, now(), tr FROM written
            ON CONFLICT (pgr_pk) DO UPDATE SET pgr_model_id = EXCLUDED.pgr_model_id,
                pgr_hash = EXCLUDED.pgr_hash, pgr_embedded_at = EXCLUDED.pgr_embedded_at,
                pgr_truncated = EXCLUDED.pgr_truncated, pgr_failed_hash = NULL,
                pgr_failure = NULL
            """).format(uuid=sql.Identifier(CHUNK_KEY), chunk=sql.Identifier(CHUNK_TEXT),
                        vector=into.vector, into=into_table, source=from_table,
                        into_state=into.state_table, from_state=source.state_table),
            {"limit": limit, "model": into.model_id}).rowcount
        conn.commit()
        return max(0, copied)
    except BaseException:
        conn.rollback()
        raise


def copy_grants(conn: psycopg.Connection, source: sql.Identifier, into: sql.Identifier
                ) -> None:
    """The privileges others have on the live chunk table, given on the new one (the app
    reads whichever set is live under the same name)."""
    rows = conn.execute(
        "SELECT CASE WHEN e.grantee = 0 THEN NULL ELSE pg_get_userbyid(e.grantee) END,"
        " e.privilege_type, e.is_grantable FROM pg_class x, aclexplode(x.relacl) e"
        " WHERE x.oid = %s::regclass AND e.grantee <> x.relowner",
        (source.as_string(conn),)).fetchall()
    for grantee, privilege, grantable in rows:
        conn.execute(sql.SQL("GRANT {} ON {} TO {}{}").format(
            sql.SQL(privilege), into,
            sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee),
            sql.SQL(" WITH GRANT OPTION" if grantable else "")))


@dataclass(frozen=True)
class View:
    name: sql.Identifier
    definition: str


def dependents(conn: psycopg.Connection, table: sql.Identifier) -> tuple[list[View], list[str]]:
    """(views over `table`, which the swap re-creates on the set that becomes live; other
    objects bound to the table itself, which the swap cannot carry over: refused).
    Definitions are printed with every name schema-qualified (search_path pg_catalog)."""
    conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
    views, refused = [], []
    for schema, name, kind, definition, owner, owner_role, current in conn.execute(
            "SELECT DISTINCT n.nspname, c.relname, c.relkind,"
            " CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid, false) END,"
            " pg_get_userbyid(c.relowner), pg_has_role(current_user, c.relowner, 'USAGE'),"
            " current_user::text"
            " FROM pg_depend d JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass"
            " AND r.oid = d.objid JOIN pg_class c ON c.oid = r.ev_class"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE d.refobjid = %s::regclass AND c.oid <> d.refobjid ORDER BY 1, 2",
            (table.as_string(conn),)).fetchall():
        if kind == "v" and not owner_role:
            refused.append(f"view {schema}.{name} (owner {owner}: pgreembed's role cannot"
                           f" re-create it; GRANT {owner} TO {current}, or run the swap as"
                           f" {owner})")
        elif kind == "v":
            views.append(View(sql.Identifier(schema, name), str(definition)))
        else:
            refused.append(f"materialized view {schema}.{name}")
    for (what,) in conn.execute(
            "SELECT 'function ' || d.objid::regprocedure::text FROM pg_depend d"
            " WHERE d.classid = 'pg_proc'::regclass AND d.refobjid = %s::regclass"
            " UNION ALL SELECT 'policy ' || polname FROM pg_policy WHERE polrelid = %s::regclass"
            " UNION ALL SELECT 'foreign key ' || conname || ' of ' || conrelid::regclass::text"
            " FROM pg_constraint WHERE contype = 'f' AND confrelid = %s::regclass",
            (table.as_string(conn),) * 3).fetchall():
        refused.append(str(what))
    conn.execute("RESET search_path")
    return views, refused


def refuse_dependents(refused: list[str], table: str, step: str) -> None:
    if refused:
        raise MigrationError(
            f"{step} refused, nothing changed: {', '.join(refused)} bound to {table} would"
            " stay on the previous chunk set after the tables are renamed; drop it before"
            " and create it again after (views over the chunk table are carried over)")


def _pairs(target: Target, other: Target) -> list[tuple[str, str, str, str]]:
    """(schema, name, the other set's name, temporary name) of each table the sets
    exchange: the chunk table, then the dirty and gone tables."""
    return [(target.schema, target.table, other.table, target.table + SWAP_SUFFIX)] + [
        (SCHEMA, f"chunk_{kind}_{target.name}", f"chunk_{kind}_{other.name}",
         f"chunk_{kind}_{target.name}{SWAP_SUFFIX}") for kind in ("dirty", "gone")]


def lock_sets(conn: psycopg.Connection, target: Target, other: Target) -> None:
    """ACCESS EXCLUSIVE on both sets' tables, the live chunk table first (the stage and the
    workers lock it first too)."""
    for schema, name, other_name, _ in _pairs(target, other):
        for each in (name, other_name):
            conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
                sql.Identifier(schema, each)))


def _rename(conn: psycopg.Connection, relation: sql.Identifier, to: str, index: bool = False
            ) -> None:
    kind = sql.SQL("INDEX" if index else "TABLE")
    conn.execute(sql.SQL("ALTER {} {} RENAME TO {}").format(kind, relation,
                                                            sql.Identifier(to)))


def _exchange_names(conn: psycopg.Connection, schema: str, a: str, b: str, temporary: str,
                    index: bool = False) -> None:
    _rename(conn, sql.Identifier(schema, a), temporary, index)
    _rename(conn, sql.Identifier(schema, b), a, index)
    _rename(conn, sql.Identifier(schema, temporary), b, index)


def ann_indexes(conn: psycopg.Connection, slot: Slot) -> list[str]:
    """Names of the slot's ANN indexes (every index on its vector column but the pending
    one)."""
    return [r[0] for r in conn.execute(
        "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = ANY(x.indkey)"
        " WHERE x.indrelid = %s::regclass AND a.attname = %s"
        " AND i.relname NOT LIKE 'pgreembed\\_pending\\_%%' ORDER BY 1",
        (slot.table.as_string(conn), slot.vector_column)).fetchall()]


def exchange(conn: psycopg.Connection, target: Target, other: Target, live: Slot,
             incoming: Slot) -> None:
    """Rename the two sets into each other's names (tables, dirty and gone tables, their
    order indexes, one ANN index each) and the slots' registry rows with them; the
    caller holds lock_sets and commits."""
    live_ann, incoming_ann = ann_indexes(conn, live), ann_indexes(conn, incoming)
    for schema, name, other_name, temporary in _pairs(target, other):
        _exchange_names(conn, schema, name, other_name, temporary)
    _exchange_names(conn, SCHEMA, f"chunk_dirty_{target.name}_order",
                    f"chunk_dirty_{other.name}_order",
                    f"chunk_dirty_{target.name}_order{SWAP_SUFFIX}", index=True)
    if len(live_ann) == 1 and len(incoming_ann) == 1:  # the app's index name stays live
        _exchange_names(conn, target.schema, live_ann[0], incoming_ann[0],
                        live_ann[0][:40] + SWAP_SUFFIX, index=True)
    conn.execute("UPDATE pgreembed.slots SET table_name = %s, role = 'old' WHERE id = %s",
                 (other.table, live.id))
    conn.execute("UPDATE pgreembed.slots SET table_name = %s, role = 'live', paused = false,"
                 " paused_by = NULL WHERE id = %s", (target.table, incoming.id))


def recreate_views(conn: psycopg.Connection, views: list[View]) -> None:
    """Each captured view again: parsed anew, its chunk table name binds to the set that
    bears it now (a view reads a table by its oid, not its name)."""
    conn.execute("SET LOCAL search_path = pg_catalog, pg_temp")
    for view in views:
        conn.execute(sql.SQL("CREATE OR REPLACE VIEW {} AS {}").format(
            view.name, sql.SQL(view.definition.rstrip().rstrip(";"))))  # noqa: S608
    conn.execute("RESET search_path")


def drop_set(conn: psycopg.Connection, other: Target) -> None:
    """The set `other` names: its chunk table (indexes with it), dirty and gone tables."""
    for relation in (app_table(other), dirty_table(other), gone_table(other)):
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(relation))


def pending_in(conn: psycopg.Connection, other: Target, slot: Slot) -> tuple[int, int]:
    """(parents still to chunk, chunks without a vector that did not fail) of a set."""
    row = conn.execute(sql.SQL(
        "SELECT (SELECT count(*) FROM {dirty}), (SELECT count(*) FROM {rows} WHERE {pending})"
    ).format(dirty=dirty_table(other), rows=slot.rows_with_state(outer=True),
             pending=slot.pending()), NO_PARAMS).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)
