"""The app's objects that depend on a vector column, read from the catalogs.

Postgres binds a view's column references (and those of BEGIN ATOMIC functions,
materialized views, rules, policies, generated columns, trigger WHEN clauses, CHECK
constraints and publication column lists) by attribute number, not by name. A swap
exchanges the columns' names, so each of these would keep reading the column it read
before: the previous model's. pg_depend records every such reference; this module reads
them, with what the swap's decisions need (owner, privileges, dependents). Read-only.

pgreembed's own objects are left out: its triggers (functions in the pgreembed schema),
and every index (the ANN indexes the swap renames, the pending partial indexes: an index
holds its column's data, and `migrate index` / the swap's index checks own them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pgreembed.store import server_versions
from pgreembed.store.slots import SCHEMA

VIEW, MATVIEW, FUNCTION, PROCEDURE, POLICY = ("view", "materialized view", "function",
                                              "procedure", "policy")
GENERATED, RULE, TRIGGER, CONSTRAINT, PUBLICATION, OTHER = (
    "generated column", "rule", "trigger", "constraint", "publication", "other")


@dataclass(frozen=True)
class ObjectRights:
    """What the connected role may do with an object (see migrations.app_objects)."""

    acts_as_owner: bool  # has the owner's privileges (member of its role, inherited)
    creates_in_schema: bool  # CREATE on the object's schema (CREATE OR REPLACE needs it)
    sets_owner: bool  # may make the owner own a re-created object (SET ROLE to it)
    owner_creates_in_schema: bool  # the owner has CREATE on the schema (ALTER ... OWNER)


@dataclass(frozen=True)
class AppObject:
    """One object that reads `column` of the app's table by attribute number."""

    kind: str
    name: str  # qualified and quoted as SQL would print it, e.g. public.docs_search
    column: str  # the vector column it depends on
    owner: str | None
    catalog: str  # the pg_depend classid, e.g. pg_rewrite
    oid: int  # the view's/materialized view's pg_class oid, else the object's own oid
    schema: str | None = None
    relname: str | None = None  # a view's name; a policy's/trigger's table name
    objname: str | None = None  # a policy's, trigger's, rule's or constraint's own name
    sql_body: bool = False  # a function with a BEGIN ATOMIC body (bound at CREATE)
    vector_output: bool = False  # a view with a vector/halfvec column, a function with one
    privileges: ObjectRights | None = None
    dependents: tuple[str, ...] = field(default=())  # objects that depend on this one

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "name": self.name, "column": self.column,
                "owner": self.owner}


@dataclass(frozen=True)
class Publication:
    """A publication that sends the app's table; `columns` None: every column."""

    name: str
    columns: tuple[str, ...] | None


_DEPENDS = """
SELECT DISTINCT d.classid::regclass::text, d.objid, a.attname, a.attnum
FROM pg_depend d
JOIN pg_attribute a ON a.attrelid = d.refobjid AND a.attnum = d.refobjsubid
WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = %s::regclass
  AND a.attname = ANY(%s) AND d.deptype IN ('n', 'a')
ORDER BY 1, 2, 3
"""


def _set_option(conn: psycopg.Connection) -> str:
    """pg_has_role's option for 'may SET ROLE to it' (its own word from Postgres 16)."""
    return "SET" if server_versions.postgres_num(conn) >= 160000 else "MEMBER"


def _privileges(conn: psycopg.Connection, owner: str | None, schema: str | None
                ) -> ObjectRights | None:
    if owner is None or schema is None:
        return None
    row = conn.execute(
        "SELECT pg_has_role(current_user, %(o)s, 'USAGE'),"
        " has_schema_privilege(current_user, %(s)s, 'CREATE'),"
        " pg_has_role(current_user, %(o)s, %(set)s),"
        # A superuser may give an object to any role (the CREATE check is skipped).
        " has_schema_privilege(%(o)s, %(s)s, 'CREATE')"
        " OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
        {"o": owner, "s": schema, "set": _set_option(conn)}).fetchone()
    assert row is not None
    return ObjectRights(*map(bool, row))


def _qualified(conn: psycopg.Connection, *parts: str) -> str:
    """`schema.name` as Postgres prints it: quoted only where a name needs it."""
    row = conn.execute("SELECT string_agg(quote_ident(p), '.' ORDER BY n)"
                       " FROM unnest(%s::text[]) WITH ORDINALITY u(p, n)", (list(parts),)
                       ).fetchone()
    assert row is not None
    return str(row[0])


def _dependents_of(conn: psycopg.Connection, catalog: str, oid: int) -> tuple[str, ...]:
    """What depends on a view (or its row type) or a function: DROP would refuse."""
    rows = conn.execute(
        """
        SELECT DISTINCT CASE WHEN d.classid = 'pg_rewrite'::regclass
                             THEN pg_describe_object('pg_class'::regclass, r.ev_class, 0)
                             ELSE pg_describe_object(d.classid, d.objid, 0) END
        FROM pg_depend d
        LEFT JOIN pg_rewrite r ON d.classid = 'pg_rewrite'::regclass AND r.oid = d.objid
        WHERE d.deptype = 'n' AND (
              (d.refclassid = %(cat)s::regclass AND d.refobjid = %(oid)s)
           OR (%(cat)s::text = 'pg_class' AND d.refclassid = 'pg_type'::regclass
               AND d.refobjid = (SELECT reltype FROM pg_class WHERE oid = %(oid)s)))
          AND coalesce(r.ev_class <> %(oid)s, true)
        ORDER BY 1
        """, {"cat": catalog, "oid": oid}).fetchall()
    return tuple(str(r[0]) for r in rows) + (_attached_to(conn, oid) if catalog == "pg_class"
                                             else ())


def _attached_to(conn: psycopg.Connection, oid: int) -> tuple[str, ...]:
    """A view's INSTEAD OF triggers, its rules other than its query (_RETURN) and its
    column defaults: Postgres records them as automatic dependencies, so DROP VIEW removes
    them silently. Re-creating the view would lose them."""
    rows = conn.execute(
        """
        SELECT pg_describe_object('pg_trigger'::regclass, oid, 0) FROM pg_trigger
        WHERE tgrelid = %(oid)s AND NOT tgisinternal
        UNION ALL
        SELECT pg_describe_object('pg_rewrite'::regclass, oid, 0) FROM pg_rewrite
        WHERE ev_class = %(oid)s AND rulename <> '_RETURN'
        UNION ALL
        SELECT pg_describe_object('pg_attrdef'::regclass, oid, 0) FROM pg_attrdef
        WHERE adrelid = %(oid)s
        ORDER BY 1
        """, {"oid": oid}).fetchall()
    return tuple(str(r[0]) for r in rows)


def _from_rewrite(conn: psycopg.Connection, objid: int, column: str) -> AppObject | None:
    row = conn.execute(
        """
        SELECT r.rulename, c.oid, c.relkind, n.nspname, c.relname, pg_get_userbyid(c.relowner),
               EXISTS (SELECT 1 FROM pg_attribute v JOIN pg_type t ON t.oid = v.atttypid
                       WHERE v.attrelid = c.oid AND v.attnum > 0
                         AND t.typname IN ('vector', 'halfvec'))
        FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
        JOIN pg_namespace n ON n.oid = c.relnamespace WHERE r.oid = %s""",
        (objid,)).fetchone()
    assert row is not None
    rule, rel_oid, relkind, schema, relname, owner, vector_output = row
    if schema == SCHEMA:
        return None  # pgreembed's own
    name = _qualified(conn, schema, relname)
    if rule != "_RETURN":
        return AppObject(RULE, f"{_qualified(conn, rule)} on {name}", column, owner,
                         "pg_rewrite", objid, schema, relname, rule)
    kind = MATVIEW if relkind == "m" else VIEW
    return AppObject(kind, name, column, owner, "pg_rewrite", rel_oid, schema, relname,
                     vector_output=bool(vector_output),
                     privileges=_privileges(conn, owner, schema),
                     dependents=_dependents_of(conn, "pg_class", rel_oid))


def _from_proc(conn: psycopg.Connection, objid: int, column: str) -> AppObject | None:
    row = conn.execute(
        """
        SELECT p.prokind, n.nspname, p.proname, pg_get_function_identity_arguments(p.oid),
               pg_get_userbyid(p.proowner), p.prosqlbody IS NOT NULL,
               EXISTS (SELECT 1 FROM pg_type t WHERE t.typname IN ('vector', 'halfvec')
                       AND (t.oid = p.prorettype OR t.oid = ANY(p.proargtypes)
                            OR t.oid = ANY(coalesce(p.proallargtypes, '{}'))))
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace WHERE p.oid = %s""",
        (objid,)).fetchone()
    assert row is not None
    prokind, schema, proname, args, owner, sql_body, vector_output = row
    if schema == SCHEMA:
        return None  # pgreembed's own trigger functions
    return AppObject(PROCEDURE if prokind == "p" else FUNCTION,
                     f"{_qualified(conn, schema, proname)}({args})", column, owner, "pg_proc",
                     objid, schema, proname, sql_body=bool(sql_body),
                     vector_output=bool(vector_output),
                     privileges=_privileges(conn, owner, schema),
                     dependents=_dependents_of(conn, "pg_proc", objid))


def _on_table(conn: psycopg.Connection, query: str, objid: int, kind: str, catalog: str,
              column: str) -> AppObject:
    """A policy, trigger or constraint: named `name on table`, owned by the table's owner."""
    row = conn.execute(query, (objid,)).fetchone()
    assert row is not None
    objname, schema, relname, owner = row
    return AppObject(kind, f"{_qualified(conn, objname)} on {_qualified(conn, schema, relname)}",
                     column, owner, catalog, objid, schema, relname, objname,
                     privileges=_privileges(conn, owner, schema))


_TABLE_OF = ("SELECT {name}, n.nspname, c.relname, pg_get_userbyid(c.relowner) FROM {catalog} x"
             " JOIN pg_class c ON c.oid = x.{rel} JOIN pg_namespace n ON n.oid = c.relnamespace"
             " WHERE x.oid = %s{extra}")



# Objects named within a table: (name column, table column, kind), for _named_on_table.
_NAMED_ON_TABLE = {"pg_policy": ("polname", "polrelid", POLICY),
                   "pg_trigger": ("tgname", "tgrelid", TRIGGER),
                   "pg_constraint": ("conname", "conrelid", CONSTRAINT)}


def _named_on_table(conn: psycopg.Connection, catalog: str, objid: int, column: str
                    ) -> AppObject | None:
    """A policy, trigger or constraint of the table, as `<name> on <schema.table>`."""
    name, rel, kind = _NAMED_ON_TABLE[catalog]
    return _on_table(conn, _TABLE_OF.format(name=f"x.{name}", catalog=catalog, rel=rel,
                                            extra=""),
                     objid, kind, catalog, column)


def _classify(conn: psycopg.Connection, catalog: str, objid: int, column: str, attnum: int
              ) -> AppObject | None:
    if catalog == "pg_rewrite":
        return _from_rewrite(conn, objid, column)
    if catalog == "pg_proc":
        return _from_proc(conn, objid, column)
    if catalog == "pg_policy":
        return _named_on_table(conn, catalog, objid, column)
    if catalog == "pg_trigger":
        found = conn.execute(
            "SELECT n.nspname = %s OR t.tgisinternal FROM pg_trigger t JOIN pg_proc p"
            " ON p.oid = t.tgfoid JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE t.oid = %s", (SCHEMA, objid)).fetchone()
        if found is None or found[0]:
            return None  # pgreembed's triggers (clear, notify, forget) or a constraint's
        return _named_on_table(conn, catalog, objid, column)
    if catalog == "pg_constraint":
        kind = conn.execute("SELECT contype FROM pg_constraint WHERE oid = %s",
                            (objid,)).fetchone()
        if kind is None or kind[0] == "n":
            return None  # the column's own NOT NULL: a property that stays with it
        return _named_on_table(conn, catalog, objid, column)
    if catalog == "pg_attrdef":
        row = conn.execute(
            "SELECT a.attname, a.attgenerated <> '', d.adnum, n.nspname, c.relname,"
            " pg_get_userbyid(c.relowner) FROM pg_attrdef d JOIN pg_attribute a"
            " ON a.attrelid = d.adrelid AND a.attnum = d.adnum JOIN pg_class c"
            " ON c.oid = d.adrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE d.oid = %s", (objid,)).fetchone()
        if row is None or row[2] == attnum or not row[1]:
            return None  # the vector column's own default stays with it
        attname, _, _, schema, relname, owner = row
        return AppObject(GENERATED, f"{_qualified(conn, schema, relname, attname)}", column,
                         owner, catalog, objid, schema, relname, attname)
    if catalog == "pg_publication_rel":
        row = conn.execute("SELECT p.pubname, pg_get_userbyid(p.pubowner) FROM"
                           " pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid"
                           " WHERE r.oid = %s", (objid,)).fetchone()
        assert row is not None
        return AppObject(PUBLICATION, _qualified(conn, row[0]), column, row[1], catalog,
                         objid, objname=row[0])
    if catalog == "pg_class":
        relkind = conn.execute("SELECT relkind FROM pg_class WHERE oid = %s",
                               (objid,)).fetchone()
        if relkind is None or relkind[0] in ("i", "I", "S"):
            return None  # indexes follow their column's data; sequences are not ours
    described = conn.execute("SELECT pg_describe_object(%s::regclass, %s, 0)",
                             (catalog, objid)).fetchone()
    return AppObject(OTHER, str(described[0]) if described else f"{catalog} {objid}", column,
                     None, catalog, objid)


def dependents(conn: psycopg.Connection, table: sql.Composable, columns: list[str]
               ) -> list[AppObject]:
    """Every app object that reads one of `columns` of `table` by attribute number, one
    entry per object (the first column it reads, by name, when it reads several)."""
    found: dict[tuple[str, int], AppObject] = {}
    for catalog, objid, column, attnum in conn.execute(
            _DEPENDS, (table.as_string(conn), columns)).fetchall():
        obj = _classify(conn, catalog, int(objid), column, int(attnum))
        if obj is not None:
            found.setdefault((obj.catalog, obj.oid), obj)
    return list(found.values())


def dependency_keys(conn: psycopg.Connection, table: sql.Composable, columns: list[str]
                    ) -> frozenset[tuple[str, int]]:
    """Every pg_depend entry on `columns` of `table`, as (catalog, oid): one query, to tell
    under a lock whether anything depending on them appeared or went since a check."""
    return frozenset((str(c), int(o)) for c, o, _, _ in conn.execute(
        _DEPENDS, (table.as_string(conn), columns)).fetchall())


def recreate_statements(conn: psycopg.Connection, oid: int, name: str) -> list[str]:
    """A materialized view's CREATE and its indexes' CREATE, as Postgres prints them."""
    row = conn.execute("SELECT pg_get_viewdef(%s::oid)", (oid,)).fetchone()
    assert row is not None
    indexes = [str(r[0]) for r in conn.execute(
        "SELECT pg_get_indexdef(indexrelid) FROM pg_index WHERE indrelid = %s ORDER BY 1",
        (oid,))]
    return [f"CREATE MATERIALIZED VIEW {name} AS {str(row[0]).strip().rstrip(';')}", *indexes]


def publications(conn: psycopg.Connection, schema: str, table: str) -> list[Publication]:
    """The publications that send `schema.table` (FOR ALL TABLES and TABLES IN SCHEMA
    included), with their column list for it, if any."""
    rows = conn.execute(
        """
        SELECT p.pubname,
               (SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_publication_rel r
                JOIN pg_attribute a ON a.attrelid = r.prrelid AND a.attnum = ANY(r.prattrs)
                WHERE r.prpubid = p.oid AND r.prrelid = pt.relid)
        FROM (SELECT DISTINCT pubname, (quote_ident(schemaname) || '.'
                                         || quote_ident(tablename))::regclass AS relid
              FROM pg_publication_tables WHERE schemaname = %s AND tablename = %s) pt
        JOIN pg_publication p ON p.pubname = pt.pubname
        ORDER BY 1
        """, (schema, table)).fetchall()
    return [Publication(name, None if cols is None else tuple(cols)) for name, cols in rows]
