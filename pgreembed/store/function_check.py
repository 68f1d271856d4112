"""Does a BEGIN ATOMIC function's body still type-check once its column has another type?

A swap that changes the column's type (vector <-> halfvec, other dimensions) runs each
BEGIN ATOMIC function's definition again under its ACCESS EXCLUSIVE lock; a body that no
longer type-checks would only fail there. This finds out before the swap waits: in a
transaction that is always rolled back, the definition is printed with the table's schema
on the search_path (so the table is named unqualified), a temporary table of the same
name and columns, the column retyped, shadows it (pg_temp is searched first), and the
definition is run again: Postgres checks the body against the new type. Nothing is kept,
and the app's table is only read (CREATE TABLE ... LIKE takes ACCESS SHARE).
"""

from __future__ import annotations

import psycopg
from psycopg import sql


def body_error(conn: psycopg.Connection, function_oid: int, schema: str, table: str,
               column: str, new_type: str) -> str | None:
    """Postgres' error for the function's body with `column` of type `new_type`, or None
    when it type-checks."""
    error: str | None = None
    try:
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT set_config('search_path', %s, true)",
                         (sql.Identifier(schema).as_string(conn),))
            row = conn.execute("SELECT pg_get_functiondef(%s::oid)", (function_oid,)
                               ).fetchone()
            assert row is not None
            conn.execute(sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(
                sql.Identifier(table), sql.Identifier(schema, table)))
            conn.execute(sql.SQL("ALTER TABLE pg_temp.{} ALTER COLUMN {} TYPE {}").format(
                sql.Identifier(table), sql.Identifier(column), sql.SQL(new_type)))
            try:
                with conn.transaction():
                    conn.execute(sql.SQL(str(row[0])))
            except psycopg.errors.LockNotAvailable:
                raise
            except psycopg.Error as exc:
                error = exc.diag.message_primary or str(exc)
    except psycopg.errors.LockNotAvailable:
        raise
    except psycopg.Error:
        return None  # no check possible here (no TEMP privilege...): the swap's own applies
    return error
