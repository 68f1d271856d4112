"""The rights pgreembed's role needs on pgai's side for import-pgai, as the GRANTs that give
them (every identifier quoted by psycopg.sql: safe to paste). Read from the catalog in a
few privilege functions: no lock, nothing changed.

pgai's objects are usually owned by the role that ran `pgai install` / `create_vectorizer`
(an admin), not by the app's table owner pgreembed's role belongs to (docs/operations.md):
- the catalog: USAGE on schema ai, SELECT on ai.vectorizer and ai.pgai_lib_version (the
  plan), UPDATE on ai.vectorizer (pgai's own `ai.disable_vectorizer_schedule` and
  `enable_...` are SECURITY INVOKER: they update its `disabled` flag as the caller), SELECT
  on ai._vectorizer_errors (pgai's failure messages);
- per vectorizer: USAGE on its queue's schema, SELECT, INSERT, UPDATE, DELETE on its queue
  (the take-over deletes the free rows it locks FOR UPDATE SKIP LOCKED; the undo inserts),
  SELECT on its failed queue; and membership of the source table's owner role (ALTER TABLE
  ... ENABLE/DISABLE TRIGGER is the owner's), as `init` advises for any target.
"""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgreembed.store.pgai_values import Vectorizer


def _missing_on_table(conn: psycopg.Connection, schema: str, table: str,
                      privileges: tuple[str, ...]) -> list[str]:
    """The privileges lacking on an existing table (looked up by name in pg_class: no
    schema USAGE needed to ask)."""
    row = conn.execute("SELECT c.oid FROM pg_class c JOIN pg_namespace n"
                       " ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
                       (schema, table)).fetchone()
    if row is None:
        return []
    return [p for p in privileges if conn.execute(
        "SELECT has_table_privilege(%s::oid, %s)", (row[0], p)).fetchone() != (True,)]


def _grant(conn: psycopg.Connection, role: sql.Identifier, privileges: list[str],
           on: sql.Composable, why: str) -> str:
    statement = sql.SQL("GRANT {} ON {} TO {};").format(
        sql.SQL(", ").join(sql.SQL(p) for p in privileges), on, role)
    return f"`{statement.as_string(conn)}` ({why})"


def _schema_usage(conn: psycopg.Connection, role: sql.Identifier, schema: str,
                  why: str) -> list[str]:
    row = conn.execute("SELECT has_schema_privilege(oid, 'USAGE') FROM pg_namespace"
                       " WHERE nspname = %s", (schema,)).fetchone()
    if row is None or row[0]:
        return []
    return [_grant(conn, role, ["USAGE"], sql.SQL("SCHEMA {}").format(sql.Identifier(schema)),
                   why)]


def _role(conn: psycopg.Connection) -> sql.Identifier:
    row = conn.execute("SELECT current_user").fetchone()
    assert row is not None
    return sql.Identifier(str(row[0]))


def catalog_grants(conn: psycopg.Connection) -> list[str]:
    """What the role lacks to read pgai's catalog and switch a vectorizer off and on ([]
    also when there is no catalog: the caller says so)."""
    role = _role(conn)
    found = _schema_usage(conn, role, "ai", "pgai's catalog lives there")
    wanted = [("vectorizer", ("SELECT", "UPDATE"),
               "the plan reads it; ai.disable_vectorizer_schedule updates it as the caller"),
              ("pgai_lib_version", ("SELECT",), "the catalog's version"),
              ("_vectorizer_errors", ("SELECT",), "pgai's failure messages")]
    for table, privileges, why in wanted:
        lacking = _missing_on_table(conn, "ai", table, privileges)
        if lacking:
            found.append(_grant(conn, role, lacking, sql.SQL("TABLE {}").format(
                sql.Identifier("ai", table)), why))
    return found


def vectorizer_grants(conn: psycopg.Connection, vec: Vectorizer) -> list[str]:
    """What the role lacks to take `vec` over and hand it back."""
    role = _role(conn)
    found = [] if vec.queue_schema == "ai" else _schema_usage(
        conn, role, vec.queue_schema, "pgai's queue tables live there")
    queue = sql.Identifier(vec.queue_schema, vec.queue_table)
    lacking = _missing_on_table(conn, vec.queue_schema, vec.queue_table,
                                ("SELECT", "INSERT", "UPDATE", "DELETE"))
    if lacking:
        found.append(_grant(conn, role, lacking, sql.SQL("TABLE {}").format(queue),
                            "the take-over moves its keys, the undo hands keys back"))
    if vec.queue_failed_table:
        failed = sql.Identifier(vec.queue_schema, vec.queue_failed_table)
        if _missing_on_table(conn, vec.queue_schema, vec.queue_failed_table, ("SELECT",)):
            found.append(_grant(conn, role, ["SELECT"], sql.SQL("TABLE {}").format(failed),
                                "pgai's failures are recorded at the take-over"))
    owner = conn.execute(
        "SELECT pg_get_userbyid(c.relowner), pg_has_role(c.relowner, 'USAGE') FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
        " AND c.relname = %s", (vec.source_schema, vec.source_table)).fetchone()
    if owner is not None and not owner[1]:
        statement = sql.SQL("GRANT {} TO {};").format(sql.Identifier(str(owner[0])), role)
        found.append(f"`{statement.as_string(conn)}` (pgai's and pgreembed's triggers on"
                     f" {vec.source_schema}.{vec.source_table} are switched by ALTER TABLE,"
                     " the owner's right)")
    return found


def lacking_message(role_grants: list[str], what: str) -> str:
    return (f"pgreembed's role lacks what {what} needs on pgai's side; as an admin (or the"
            " objects' owner) run: " + "; ".join(role_grants) + "; nothing was changed")
