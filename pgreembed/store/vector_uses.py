"""How an app object uses the vector types, read from the catalogs: what a swap that
changes the column's base type (vector <-> halfvec) cannot re-create unchanged.

pg_depend records, for a view's query, a BEGIN ATOMIC body or a policy's expressions,
each operator and function it calls (a cast by function is a call of that function). An
object that calls one taking a vector type (`<=>`, `vector_dims`, the vector -> halfvec
cast...) resolved it for the column's type when it was created; re-parsed against a
column of the other type, Postgres picks another operator or casts the column itself.
An object that only passes the column through calls none. Read-only.
"""

from __future__ import annotations

import re

import psycopg

from pgreembed.store.app_objects import FUNCTION, POLICY, PROCEDURE, VIEW, AppObject

VECTOR_TYPES = ("vector", "halfvec", "sparsevec")

# The pg_depend entries (classid, objid) of the object's parsed definition.
_SOURCE = {
    VIEW: "SELECT 'pg_rewrite'::regclass, r.oid FROM pg_rewrite r"
          " WHERE r.ev_class = %(oid)s AND r.rulename = '_RETURN'",
    FUNCTION: "SELECT 'pg_proc'::regclass, %(oid)s::oid",
    PROCEDURE: "SELECT 'pg_proc'::regclass, %(oid)s::oid",
    POLICY: "SELECT 'pg_policy'::regclass, %(oid)s::oid",
}

_USES = """
WITH source(classid, objid) AS ({source}),
     vector_types AS (SELECT oid FROM pg_type WHERE typname = ANY(%(types)s))
SELECT DISTINCT pg_describe_object(d.refclassid, d.refobjid, 0)
FROM pg_depend d JOIN source s ON s.classid = d.classid AND s.objid = d.objid
LEFT JOIN pg_operator o ON d.refclassid = 'pg_operator'::regclass AND o.oid = d.refobjid
LEFT JOIN pg_proc p ON d.refclassid = 'pg_proc'::regclass AND p.oid = d.refobjid
LEFT JOIN pg_cast c ON d.refclassid = 'pg_cast'::regclass AND c.oid = d.refobjid
WHERE o.oprleft IN (SELECT oid FROM vector_types)
   OR o.oprright IN (SELECT oid FROM vector_types)
   OR (p.oid IS NOT NULL AND p.oid <> s.objid
       AND EXISTS (SELECT 1 FROM vector_types t WHERE t.oid = ANY(p.proargtypes)))
   OR c.castsource IN (SELECT oid FROM vector_types)
   OR c.casttarget IN (SELECT oid FROM vector_types)
ORDER BY 1
"""


def vector_operations(conn: psycopg.Connection, obj: AppObject) -> list[str]:
    """The operators, functions and casts on vector types that `obj` calls, described as
    Postgres does (`operator <=>(vector,vector)`); empty for an object the swap does not
    re-create from its definition."""
    source = _SOURCE.get(obj.kind)
    if source is None:
        return []
    rows = conn.execute(_USES.format(source=source),
                        {"oid": obj.oid, "types": list(VECTOR_TYPES)}).fetchall()
    return [str(r[0]) for r in rows]


def definition(conn: psycopg.Connection, obj: AppObject) -> str:
    """`obj`'s definition as Postgres prints it now (a view looked up by name: re-created
    by a swap, it has another oid)."""
    if obj.kind == VIEW:
        row = conn.execute("SELECT pg_get_viewdef(to_regclass(%s))",
                           (f"{obj.name}",)).fetchone()
        body = str(row[0]).strip() if row and row[0] else ""
        return f"CREATE VIEW {obj.name} AS\n{body}"
    if obj.kind in (FUNCTION, PROCEDURE):
        row = conn.execute("SELECT pg_get_functiondef(%s::oid)", (obj.oid,)).fetchone()
        return str(row[0]).strip() if row else ""
    if obj.kind == POLICY:
        row = conn.execute("SELECT concat_ws(' ', 'USING (' || pg_get_expr(polqual, polrelid)"
                           " || ')', 'WITH CHECK (' || pg_get_expr(polwithcheck, polrelid)"
                           " || ')') FROM pg_policy WHERE oid = %s", (obj.oid,)).fetchone()
        return f"POLICY {obj.name} {row[0] if row else ''}"
    return ""


def casts_column(conn: psycopg.Connection, text: str, column: str) -> bool:
    """Whether a definition as Postgres prints it casts `column` itself: `column::type`,
    `(t.column)::type` (Postgres prints the casts it adds, implicit ones too, that way)."""
    row = conn.execute("SELECT quote_ident(%s)", (column,)).fetchone()
    assert row is not None
    return re.search(rf'(?<![\w$"]){re.escape(str(row[0]))}\)*::', text) is not None
