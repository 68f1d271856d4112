"""What a swap does with each app object that reads a vector column, decided up front.

A swap exchanges the columns' names; the app's objects that read a column by attribute
number (store.app_objects) are kept on the column they name, in the swap's own
transaction (migrations.rebind):

- views: CREATE OR REPLACE VIEW with their definition captured before the rename (keeps
  owner, grants, comments and dependents). When the swap changes the column's type (other
  dimensions, vector <-> halfvec), a view with a vector column cannot be replaced: it is
  dropped and created again with its options, owner, grants and comments, and the swap is
  refused up front if other objects depend on it;
- BEGIN ATOMIC functions and procedures: CREATE OR REPLACE with pg_get_functiondef (their
  signature is part of it, so a change of the column's type never needs a new function;
  a body that no longer type-checks against the new type is refused up front, checked in
  a rolled-back transaction (store.function_check));
- row-level security policies: ALTER POLICY with their USING / WITH CHECK captured before.

What cannot be kept on the column under the swap's short lock is refused before anything
changes, each object named with its way out: materialized views (re-creating one means
running its query under the lock; drop it before the swap and create it after: its
REFRESH would otherwise keep reading the previous column), generated columns, rules,
triggers whose WHEN or UPDATE OF names the column, constraints, publication column lists
and row filters, and anything else. Privileges are checked up front too.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from pgreembed.config import Target
from pgreembed.errors import MigrationError
from pgreembed.migrations import type_change
from pgreembed.store import app_objects as catalog
from pgreembed.store.app_objects import AppObject, Publication
from pgreembed.store.function_check import body_error
from pgreembed.store.slots import Slot, load_slots

REBIND, RECREATE, REFUSE = "rebind", "recreate", "refuse"


@dataclass(frozen=True)
class Decision:
    """One object and what the swap will do with it (`detail`: how, or why not and the way
    out)."""

    obj: AppObject
    action: str
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {**self.obj.as_dict(), "action": self.action, "detail": self.detail}

    def line(self) -> str:
        owner = f" (owner {self.obj.owner})" if self.obj.owner else ""
        return f"{self.obj.kind} {self.obj.name}{owner} reads {self.obj.column}: {self.detail}"


def _grant(conn: psycopg.Connection, role: str) -> str:
    user = conn.execute("SELECT current_user").fetchone()
    assert user is not None
    return sql.SQL("GRANT {} TO {}").format(sql.Identifier(role),
                                           sql.Identifier(str(user[0]))).as_string(conn)


def _missing_privileges(conn: psycopg.Connection, obj: AppObject, recreate: bool) -> str | None:
    """What the connected role lacks to keep `obj` on its column, as the grant to make."""
    p, owner, schema = obj.privileges, obj.owner, obj.schema
    if p is None or owner is None or schema is None:
        return None
    if not p.acts_as_owner or (recreate and not p.sets_owner):
        return (f"pgreembed's role cannot act as its owner {owner}: {_grant(conn, owner)}"
                " (or run the swap as that role)")
    if obj.kind == catalog.POLICY:
        return None  # ALTER POLICY needs the table's ownership alone
    if not p.creates_in_schema:
        user = conn.execute("SELECT current_user").fetchone()
        assert user is not None
        return ("re-creating it needs CREATE on its schema: "
                + sql.SQL("GRANT CREATE ON SCHEMA {} TO {}").format(
                    sql.Identifier(schema), sql.Identifier(str(user[0]))).as_string(conn))
    if recreate and not p.owner_creates_in_schema:
        return (f"its owner {owner} needs CREATE on its schema to own it again: "
                + sql.SQL("GRANT CREATE ON SCHEMA {} TO {}").format(
                    sql.Identifier(schema), sql.Identifier(owner)).as_string(conn))
    return None


def _way_out(kind: str, name: str) -> str:
    return {
        catalog.MATVIEW: f"drop it before the swap and create it again after (its REFRESH"
                         f" would keep reading the previous column): DROP MATERIALIZED VIEW"
                         f" {name}; then swap; then create it again with its indexes (and"
                         " grants)",
        catalog.GENERATED: "make it a plain column before the swap (ALTER TABLE ... ALTER"
                           " COLUMN ... DROP EXPRESSION) or drop it, and add it again after",
        catalog.RULE: "drop it before the swap (DROP RULE) and create it again after",
        catalog.TRIGGER: "drop it before the swap (DROP TRIGGER) and create it again after",
        catalog.CONSTRAINT: "drop it before the swap (ALTER TABLE ... DROP CONSTRAINT) and add"
                            " it again after (ADD CONSTRAINT ... NOT VALID, then VALIDATE"
                            " CONSTRAINT)",
        catalog.PUBLICATION: "take the column out of the publication's column list (or row"
                             " filter) for the swap (ALTER PUBLICATION ... SET TABLE) and put"
                             " it back after, then ALTER SUBSCRIPTION ... REFRESH PUBLICATION"
                             " on each subscriber",
    }.get(kind, "drop it before the swap and create it again after")


def decide(conn: psycopg.Connection, obj: AppObject, type_changes: bool,
           body_error: str | None = None) -> Decision:
    """What the swap will do with `obj` (see the module's docstring); `body_error`: a
    BEGIN ATOMIC body's error against the column's type after the swap."""
    if obj.schema and obj.schema.startswith("pg_temp"):
        return Decision(obj, REFUSE, "a temporary object of another session: it cannot be"
                        " re-created from here, and goes when that session ends (end it, or"
                        " swap after)")
    if obj.kind == catalog.VIEW or (obj.kind in (catalog.FUNCTION, catalog.PROCEDURE)
                                    and obj.sql_body):
        # A function's signature is in its definition: replacing it never changes it. A
        # view's column types come from its query: another column type needs a new view.
        recreate = obj.kind == catalog.VIEW and obj.vector_output and type_changes
        missing = _missing_privileges(conn, obj, recreate)
        if missing:
            return Decision(obj, REFUSE, f"cannot be kept on {obj.column}: {missing}")
        if body_error:
            return Decision(obj, REFUSE, "the swap changes the column's type and its body no"
                            f" longer type-checks against it ({body_error}). Way out: drop it"
                            " before the swap and create it again after for the new type"
                            " (or make its body read the column through a cast)")
        if recreate and obj.dependents:
            return Decision(obj, REFUSE, "the swap changes the column's type, so it must be"
                            " dropped and created again, but other objects depend on it:"
                            f" {', '.join(obj.dependents)}. Drop those before the swap (or"
                            " the rollback) and create them again after it; a migration"
                            " not started yet can instead keep the live column's dimensions"
                            " and type")
        if recreate:
            return Decision(obj, RECREATE, f"dropped and created again in the swap's"
                            f" transaction (the column's type changes), with its options,"
                            f" owner, grants and comments: it keeps reading {obj.column}")
        return Decision(obj, REBIND, "re-created from its definition in the swap's"
                        f" transaction (CREATE OR REPLACE): it keeps reading {obj.column}")
    if obj.kind == catalog.POLICY:
        missing = _missing_privileges(conn, obj, False)
        if missing:
            return Decision(obj, REFUSE, f"cannot be kept on {obj.column}: {missing}")
        return Decision(obj, REBIND, "its USING / WITH CHECK expressions are set again in the"
                        f" swap's transaction (ALTER POLICY): it keeps reading {obj.column}")
    why = ("its body is parsed at each call and follows the name by itself"
           if obj.kind in (catalog.FUNCTION, catalog.PROCEDURE) else None)
    if why:
        return Decision(obj, REBIND, why)
    way_out = _way_out(obj.kind, obj.name)
    if obj.kind == catalog.MATVIEW:
        way_out += ":" + "".join("\n      " + statement.replace("\n", "\n      ") + ";"
                                 for statement in catalog.recreate_statements(
                                     conn, obj.oid, obj.name))
    return Decision(obj, REFUSE, f"the swap cannot keep it on {obj.column} under its short"
                    f" lock: it would read the other model's column. Way out: {way_out}")


def swap_decisions(conn: psycopg.Connection, table: sql.Composable, columns: list[str],
                   from_type: str, to_type: str) -> list[Decision]:
    """Each app object reading one of `columns` (the live one, and the incoming one when it
    exists), decided for a swap from a `from_type` to a `to_type` column (`vector(384)`)."""
    found = catalog.dependents(conn, table, columns)
    if from_type == to_type:
        return [decide(conn, obj, False) for obj in found]
    row = conn.execute("SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n"
                       " ON n.oid = c.relnamespace WHERE c.oid = %s::regclass",
                       (table.as_string(conn),)).fetchone()
    assert row is not None
    # After the swap, the name of columns[0] (the live one) bears `to_type`, the other's
    # `from_type`: a BEGIN ATOMIC body is checked against that before anything waits.
    return [_refuse_type_sensitive(conn, decide(conn, obj, True, body_error(
                conn, obj.oid, row[0], row[1], obj.column,
                to_type if obj.column == columns[0] else from_type)
                if obj.sql_body else None), from_type, to_type)
            for obj in found]


def _refuse_type_sensitive(conn: psycopg.Connection, decision: Decision, from_type: str,
                           to_type: str) -> Decision:
    """A swap that changes the base type (vector <-> halfvec) refuses what applies an
    operator, function or cast to the column (migrations.type_change)."""
    if decision.action == REFUSE:
        return decision  # refused already, with its own way out
    why = type_change.refusal(conn, decision.obj, from_type, to_type)
    return decision if why is None else Decision(decision.obj, REFUSE, why)


def refuse_swap(decisions: list[Decision], step: str) -> None:
    """Raise naming every object the swap cannot keep on its column; nothing changed."""
    refused = [d for d in decisions if d.action == REFUSE]
    if refused:
        raise MigrationError(
            f"{step} refused, nothing changed: {len(refused)} app object(s) read the vector"
            " column by attribute number and cannot be kept on it:"
            + "".join(f"\n  - {d.line()}" for d in refused))


def check_swap(conn: psycopg.Connection, live: Slot, other: Slot, step: str) -> list[Decision]:
    """The decisions for swapping `live` and `other`; raises if any object is refused."""
    found = swap_decisions(conn, live.table, [live.vector_column, other.vector_column],
                           live.column_type, other.column_type)
    refuse_swap(found, step)
    return found


def refuse_drop(conn: psycopg.Connection, table: sql.Composable, column: str, step: str
                ) -> None:
    """Before dropping `column` (finalize, cancel): refuse naming what depends on it, rather
    than fail on Postgres' 'use DROP ... CASCADE' or drop a constraint with it silently."""
    found = catalog.dependents(conn, table, [column])
    if found:
        raise MigrationError(
            f"{step} refused, nothing changed: {len(found)} app object(s) still read"
            f" {column}, the column it would drop (point them at the live column by"
            " re-creating them, or drop them, then run it again):"
            + "".join(f"\n  - {o.kind} {o.name}" + (f" (owner {o.owner})" if o.owner else "")
                      for o in found))


def publication_notes(conn: psycopg.Connection, publications: list[Publication],
                      table: sql.Composable, new_column: str, new_type: str) -> list[str]:
    """Logical replication copies no DDL: a side column a publication sends breaks each
    subscriber that lacks it. What to do, per publication (the SQL quoted for this server;
    the runbook has the whole procedure)."""
    notes = []
    for pub in publications:
        if pub.columns is not None and new_column not in pub.columns:
            continue  # its column list leaves the new column out
        add = sql.SQL("ALTER TABLE {} ADD COLUMN {} {}").format(
            table, sql.Identifier(new_column), sql.SQL(new_type.split("(")[0]))
        notes.append(
            f"table {table.as_string(conn)} is in publication"
            f" {sql.Identifier(pub.name).as_string(conn)} without a column list: the new"
            f" column {new_column} will be replicated, and subscribers that lack it stop"
            " applying changes (logical replication copies no DDL). Add it on every"
            f" subscriber first ({add.as_string(conn)}; without dimensions, so the swap's"
            " exchange of names replicates too), or publish the table with a column list"
            " that leaves the vector columns out")
    return notes


def report(conn: psycopg.Connection, target: Target) -> tuple[list[Decision], list[str]]:
    """For `start` and `doctor`: each app object reading a slot's column with what the next
    swap would do (no migration open: a swap to the same type), and the publication notes."""
    slots = [s for s in load_slots(conn, target) if s.role != "dropped"]
    live = next((s for s in slots if s.role == "live"), None)
    if live is None:
        return [], []
    other = next((s for s in slots if s.role in ("next", "old")), None)
    to_type = other.column_type if other else live.column_type
    found = swap_decisions(conn, live.table, [s.vector_column for s in slots],
                           live.column_type, to_type)
    pubs = catalog.publications(conn, target.schema, target.table)
    if other is not None:
        notes = publication_notes(conn, pubs, live.table, other.vector_column, to_type)
    else:
        notes = [f"{note} (when a migration adds one)" for note in publication_notes(
            conn, pubs, live.table, f"{live.vector_column}__m<id>", live.column_type)]
    return found, notes
