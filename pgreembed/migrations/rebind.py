"""Keep the app's views, BEGIN ATOMIC functions and policies on the column they name
across a swap, in the swap's own transaction.

`check` runs before the swap waits: it decides (migrations.app_objects) and refuses what
cannot be kept. `capture` runs under the swap's ACCESS EXCLUSIVE lock, before the columns'
names are exchanged: it verifies in one query that the objects are the ones decided for,
and reads each object's definition as Postgres prints it (pg_get_viewdef, pg_get_functiondef,
pg_get_expr), which names the columns. `Kept.apply`, after the exchange, runs those
definitions again: parsed anew, each name binds to the column that bears it now. Capture
and apply share one transaction and one search_path, so every other name resolves as
before. A lock the app holds on a view makes the statement wait at most the swap's
lock_timeout; the swap is then retried like any busy attempt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from pgreembed.errors import MigrationError
from pgreembed.migrations import app_objects as decisions
from pgreembed.migrations import type_change
from pgreembed.store import app_objects as catalog
from pgreembed.store.slots import Slot

Statement = sql.SQL | sql.Composed
Step = Statement | Callable[[psycopg.Connection], None]  # a callable reads what it needs


@dataclass
class _Object:
    decision: decisions.Decision
    statements: list[Step] = field(default_factory=list)


def _acl(conn: psycopg.Connection, oid: int) -> list[tuple[str | None, str, bool]]:
    """A relation's grants, (grantee or None: PUBLIC, privilege, with grant option)."""
    rows = conn.execute(
        "SELECT CASE WHEN e.grantee = 0 THEN NULL ELSE pg_get_userbyid(e.grantee) END,"
        " e.privilege_type, e.is_grantable FROM pg_class x,"
        " aclexplode(coalesce(x.relacl, acldefault('r', x.relowner))) e WHERE x.oid = %s",
        (oid,)).fetchall()
    return [(r[0], str(r[1]), bool(r[2])) for r in rows]


def _revoke_all(name: sql.Identifier, on: sql.Composable) -> Step:
    """Revoke whatever the re-created relation was given (by default privileges too), so
    that its grants become exactly the captured ones."""
    def run(conn: psycopg.Connection) -> None:
        grantees = [r[0] for r in conn.execute(
            "SELECT DISTINCT CASE WHEN e.grantee = 0 THEN NULL"
            " ELSE pg_get_userbyid(e.grantee) END FROM pg_class x,"
            " aclexplode(coalesce(x.relacl, acldefault('r', x.relowner))) e"
            " WHERE x.oid = %s::regclass", (name.as_string(conn),)).fetchall()]
        if grantees:
            conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(on, sql.SQL(", ").join(
                sql.SQL("PUBLIC") if g is None else sql.Identifier(g) for g in grantees)))
    return run


def _restore(obj: catalog.AppObject, name: sql.Identifier, on: sql.Composable,
             old_acl: list[tuple[str | None, str, bool]], user: str) -> list[Step]:
    """Owner and grants of a dropped relation, for the statements after its CREATE."""
    out: list[Step] = []
    if obj.owner and obj.owner != user:
        out.append(sql.SQL("ALTER {} OWNER TO {}").format(on, sql.Identifier(obj.owner)))
    out.append(_revoke_all(name, on))
    for grantee, privilege, option in old_acl:
        out.append(sql.SQL("GRANT {} ON {} TO {}{}").format(
            sql.SQL(privilege), on, sql.SQL("PUBLIC") if grantee is None
            else sql.Identifier(grantee), sql.SQL(" WITH GRANT OPTION" if option else "")))
    return out


def _view(conn: psycopg.Connection, decision: decisions.Decision) -> list[Step]:
    obj = decision.obj
    assert obj.schema and obj.relname
    name = sql.Identifier(obj.schema, obj.relname)
    row = conn.execute("SELECT pg_get_viewdef(%s::oid), coalesce(reloptions, '{}'),"
                       " obj_description(%s::oid, 'pg_class') FROM pg_class WHERE oid = %s",
                       (obj.oid, obj.oid, obj.oid)).fetchone()
    assert row is not None
    definition = sql.SQL(str(row[0]).strip().rstrip(";"))
    options = [option.split("=", 1) for option in row[1]]
    with_options = sql.SQL(" WITH ({})").format(sql.SQL(", ").join(
        sql.SQL("{} = {}").format(sql.Identifier(key), sql.Literal(value))
        for key, value in options)) if options else sql.SQL("")
    if decision.action == decisions.REBIND:
        # Without WITH, CREATE OR REPLACE VIEW would reset the options (security_barrier...).
        return [sql.SQL("CREATE OR REPLACE VIEW {}{} AS {}").format(name, with_options,
                                                                   definition)]
    comments: list[Statement] = []
    if row[2] is not None:
        comments.append(sql.SQL("COMMENT ON VIEW {} IS {}").format(name, sql.Literal(row[2])))
    for column, text in conn.execute(
            "SELECT attname, col_description(attrelid, attnum) FROM pg_attribute"
            " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped"
            " AND col_description(attrelid, attnum) IS NOT NULL", (obj.oid,)).fetchall():
        comments.append(sql.SQL("COMMENT ON COLUMN {} IS {}").format(
            sql.Identifier(obj.schema, obj.relname, column), sql.Literal(text)))
    on = sql.SQL("TABLE {}").format(name)  # GRANT ... ON TABLE covers views
    user = conn.execute("SELECT current_user").fetchone()
    assert user is not None
    return [sql.SQL("DROP VIEW {}").format(name),
            sql.SQL("CREATE VIEW {}{} AS {}").format(name, with_options, definition),
            *_restore(obj, name, on, _acl(conn, obj.oid), str(user[0])),
            *_column_grants(conn, obj.oid, name), *comments]


def _column_grants(conn: psycopg.Connection, oid: int, name: sql.Identifier) -> list[Step]:
    """A relation's column-level grants (pg_attribute.attacl), as GRANTs to run again."""
    return [sql.SQL("GRANT {} ({}) ON TABLE {} TO {}{}").format(
        sql.SQL(privilege), sql.Identifier(column), name,
        sql.SQL("PUBLIC") if grantee is None else sql.Identifier(grantee),
        sql.SQL(" WITH GRANT OPTION" if option else ""))
        for column, grantee, privilege, option in conn.execute(
            "SELECT a.attname, CASE WHEN e.grantee = 0 THEN NULL"
            " ELSE pg_get_userbyid(e.grantee) END, e.privilege_type, e.is_grantable"
            " FROM pg_attribute a, aclexplode(a.attacl) e WHERE a.attrelid = %s"
            " AND a.attnum > 0 AND NOT a.attisdropped AND a.attacl IS NOT NULL"
            " ORDER BY a.attnum, 2, 3", (oid,)).fetchall()]


def _function(conn: psycopg.Connection, decision: decisions.Decision) -> list[Step]:
    row = conn.execute("SELECT pg_get_functiondef(%s::oid)", (decision.obj.oid,)).fetchone()
    assert row is not None
    return [sql.SQL(str(row[0]))]  # "CREATE OR REPLACE FUNCTION ..." as Postgres prints it


def _policy(conn: psycopg.Connection, decision: decisions.Decision) -> list[Step]:
    obj = decision.obj
    row = conn.execute("SELECT pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck,"
                       " polrelid) FROM pg_policy WHERE oid = %s", (obj.oid,)).fetchone()
    assert row is not None and obj.schema and obj.relname and obj.objname
    clauses = [sql.SQL("{} ({})").format(sql.SQL(word), sql.SQL(expr))
               for word, expr in (("USING", row[0]), ("WITH CHECK", row[1])) if expr]
    return [sql.SQL("ALTER POLICY {} ON {} {}").format(
        sql.Identifier(obj.objname), sql.Identifier(obj.schema, obj.relname),
        sql.SQL(" ").join(clauses))] if clauses else []


@dataclass(frozen=True)
class Kept:
    """The captured statements that put each object back on the column it names."""

    objects: list[_Object]
    column_types: tuple[str, str] = ("", "")  # the column's type before and after the swap

    def apply(self, conn: psycopg.Connection) -> list[decisions.Decision]:
        """Run them (after the exchange of names, in the same transaction)."""
        for each in self.objects:
            for statement in each.statements:
                try:
                    if callable(statement):
                        statement(conn)
                    else:
                        conn.execute(statement)
                except psycopg.errors.LockNotAvailable:
                    raise  # the app holds the object: this attempt is retried
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"could not keep {each.decision.obj.kind} {each.decision.obj.name} on"
                        f" {each.decision.obj.column}: {exc.diag.message_primary or exc};"
                        " nothing changed") from None
            # Safety net: never a silent change of how it uses the column (type_change).
            type_change.check_recreated(conn, each.decision.obj, *self.column_types)
        return [each.decision for each in self.objects]


class ObjectsChanged(Exception):
    """An object came to depend on the columns (or went) between the check and the lock:
    this attempt is rolled back and the swap checks again."""


@dataclass(frozen=True)
class Checked:
    """What the check before waiting decided, and the dependencies it saw (see capture)."""

    decisions: list[decisions.Decision]
    keys: frozenset[tuple[str, int]]


def check(conn: psycopg.Connection, live: Slot, other: Slot, step: str) -> Checked:
    """Before waiting for the lock: decide for every app object, refuse what cannot be
    kept (raises), and note what depends on the two columns."""
    columns = [live.vector_column, other.vector_column]
    return Checked(decisions.check_swap(conn, live, other, step),
                   catalog.dependency_keys(conn, live.table, columns))


def lock_views(conn: psycopg.Connection, checked: Checked) -> None:
    """Lock the app's views over the vector columns before their table, in the order the
    app's queries take them (view, then table). The other order deadlocks with any query
    on a view that arrives during the swap: it holds the view and waits for the table while
    the swap holds the table and waits for the view. `ALTER VIEW ... OWNER TO` its own
    owner changes nothing and takes the view's ACCESS EXCLUSIVE lock alone (LOCK TABLE on
    a view would also lock its tables, and refuse unless the view's owner may write them).
    The swap's lock_timeout applies: a busy attempt is retried. The views are those the
    check found (store.app_objects.dependents); capture verifies none came since."""
    views = sorted((d.obj for d in checked.decisions if d.obj.kind == catalog.VIEW),
                   key=lambda obj: obj.oid)
    for view in views:
        assert view.schema and view.relname and view.owner
        conn.execute(sql.SQL("ALTER VIEW {} OWNER TO {}").format(
            sql.Identifier(view.schema, view.relname), sql.Identifier(view.owner)))


def capture(conn: psycopg.Connection, live: Slot, other: Slot, checked: Checked) -> Kept:
    """Under the lock, before the exchange: verify in one query that what depends on the
    columns is what the check decided for (else ObjectsChanged), then read the
    definitions (see the module). The lock is held for one query, not a whole check."""
    columns = [live.vector_column, other.vector_column]
    if catalog.dependency_keys(conn, live.table, columns) != checked.keys:
        raise ObjectsChanged()
    kept = []
    for decision in checked.decisions:
        kind = decision.obj.kind
        if kind == catalog.VIEW:
            kept.append(_Object(decision, _view(conn, decision)))
        elif kind in (catalog.FUNCTION, catalog.PROCEDURE) and decision.obj.sql_body:
            kept.append(_Object(decision, _function(conn, decision)))
        elif kind == catalog.POLICY:
            kept.append(_Object(decision, _policy(conn, decision)))
    return Kept(kept, (live.column_type, other.column_type))
