"""A swap that changes the vector column's base type (vector <-> halfvec) never silently
changes how an app object uses the column.

The swap re-creates views, BEGIN ATOMIC functions and policies from their definition as
Postgres prints it (migrations.rebind). That text has the casts Postgres added made
explicit (`embedding <=> q::halfvec` once the column is halfvec), and parsed again against
a column of the other type it casts the column itself (`embedding::halfvec <=>
q::halfvec`): the ANN index is no longer used (a sequential scan and a sort at every
call), distances at another precision, and nothing says so. Measured on PostgreSQL 15
and 18 with pgvector 0.8 (tests/test_app_objects_type_change.py).

So, when the base type changes, an object that calls an operator, function or cast on a
vector type (store.vector_uses) is refused up front, named with its definition and the
way out; one that only passes the column through is re-created as before. As a safety
net, `check_recreated` runs in the swap's transaction after each re-creation: a new
definition that casts the column itself fails the swap, which then changes nothing.
"""

from __future__ import annotations

import psycopg

from pgreembed.errors import MigrationError
from pgreembed.store import app_objects as catalog
from pgreembed.store import vector_uses
from pgreembed.store.app_objects import AppObject

# What the swap re-creates from a definition (the others are kept or refused as they are).
_RECREATED = (catalog.VIEW, catalog.FUNCTION, catalog.PROCEDURE, catalog.POLICY)


def base_type(column_type: str) -> str:
    """`halfvec(384)` -> `halfvec`."""
    return column_type.split("(", 1)[0].strip()


def changes_base_type(from_type: str, to_type: str) -> bool:
    return base_type(from_type) != base_type(to_type)


def _drop(obj: AppObject) -> str:
    if obj.kind == catalog.POLICY:
        return f"DROP POLICY {obj.name}"
    return f"DROP {obj.kind.upper()} {obj.name}"


def _way_out(obj: AppObject, to_base: str, definition: str) -> str:
    also = (f" (and what depends on it: {', '.join(obj.dependents)})"
            if obj.dependents else "")
    shown = definition.replace("\n", "\n      ")
    return (f"Way out: drop it before the swap ({_drop(obj)}){also}, then create it again"
            f" after the swap from your own source, written against the {to_base} column."
            f" Its definition now, as Postgres prints it:\n      {shown}")


def refusal(conn: psycopg.Connection, obj: AppObject, from_type: str, to_type: str
            ) -> str | None:
    """Why a swap from a `from_type` to a `to_type` column refuses `obj`, with the way
    out; None when the base type stays or `obj` only passes the column through."""
    if not changes_base_type(from_type, to_type) or obj.kind not in _RECREATED:
        return None
    if obj.kind in (catalog.FUNCTION, catalog.PROCEDURE) and not obj.sql_body:
        return None  # parsed at each call against the column that bears the name
    uses = vector_uses.vector_operations(conn, obj)
    if not uses:
        return None
    from_base, to_base = base_type(from_type), base_type(to_type)
    return (f"the swap changes {obj.column} from {from_base} to {to_base}, and this object"
            f" applies {', '.join(uses)} to it: re-created from its definition against"
            f" {to_base} it would use the column differently (other operators, or the"
            " column itself cast: its ANN index no longer used, distances at another"
            " precision). "
            + _way_out(obj, to_base, vector_uses.definition(conn, obj)))


def check_recreated(conn: psycopg.Connection, obj: AppObject, from_type: str, to_type: str
                    ) -> None:
    """In the swap's transaction, after `obj` was re-created: raise (the swap rolls back)
    if the base type changed and its new definition casts the vector column itself."""
    if not changes_base_type(from_type, to_type) or obj.kind not in _RECREATED:
        return
    text = vector_uses.definition(conn, obj)
    if vector_uses.casts_column(conn, text, obj.column):
        to_base = base_type(to_type)
        raise MigrationError(
            f"the swap's transaction was rolled back, nothing changed: {obj.kind} {obj.name}"
            f" re-created against the {to_base} column casts {obj.column} itself (its ANN"
            " index would no longer be used, distances at another precision). "
            + _way_out(obj, to_base, text))
