"""A swap that changes the vector column's base type (vector <-> halfvec) and the app's
objects that apply an operator or a function to the column.

Re-created from their deparsed text against a column of the other type, such objects
change: deparse makes implicit casts explicit (`q::halfvec`), and parsing that against a
`vector` column casts the column itself (`embedding::halfvec <=> q::halfvec`): the ANN
index is no longer used, distances lose precision. The swap refuses them up front,
naming each with its definition; objects that only pass the column through are re-created
unchanged (their definition compared before and after a swap and a rollback).
"""

from __future__ import annotations

import pytest
from psycopg import sql

from pgreembed.errors import MigrationError
from pgreembed.migrations import type_change
from pgreembed.store import app_objects as app_catalog
from pgreembed.store import server_versions
from tests.helpers import (
    Stack,
    column_type,
    json_document,
    migrate,
    require_server,
    running,
    seed,
    wait_filled,
)
from tests.test_app_objects import refused

pytestmark = pytest.mark.second_server  # PostgreSQL 15 too (.ci/run)

DISTANCE_OBJECTS = """
CREATE FUNCTION nearest_doc(q vector) RETURNS SETOF bigint LANGUAGE sql STABLE
    BEGIN ATOMIC SELECT id FROM docs ORDER BY embedding <=> q LIMIT 5; END;
CREATE VIEW docs_near AS SELECT id,
    embedding <=> (SELECT embedding FROM docs ORDER BY id LIMIT 1) AS distance FROM docs;
"""
PASS_THROUGH = "CREATE VIEW docs_vectors AS SELECT id, embedding FROM docs"
SENSITIVE = {"public.nearest_doc(q vector)", "public.docs_near"}


def definition(stack: Stack) -> str:
    """The pass-through view's query as Postgres prints it."""
    with stack.connect() as conn:
        row = conn.execute("SELECT pg_get_viewdef('docs_vectors'::regclass)").fetchone()
    assert row is not None
    return str(row[0])


def test_type_changing_swap_refuses_what_applies_operators_to_the_column(
        stack: Stack) -> None:
    require_server(stack.dsn, server_versions.HALFVEC)
    seed(stack, 30)
    running(stack)
    wait_filled(stack, "embedding")
    with stack.connect() as conn:
        conn.execute(DISTANCE_OBJECTS)
        conn.execute(PASS_THROUGH)
    before = definition(stack)

    # plan --derive lists the SQL and each app object with what the swap will do.
    plan = json_document(stack.cli("migrate", "plan", "--target", "docs", "--derive",
                                   "halfvec", "--json").stdout)
    assert plan["statements"], plan
    actions = {o["name"]: o["action"] for o in plan["app_objects"]}
    assert actions == {**{name: "refuse" for name in SENSITIVE},
                       "public.docs_vectors": "recreate"}, actions
    reasons = {o["name"]: o["detail"] for o in plan["app_objects"]}
    assert all("halfvec" in reasons[name] for name in SENSITIVE), reasons

    started = migrate(stack, "start", "--derive", "halfvec")
    assert all(name in started for name in SENSITIVE), started
    doctor = json_document(stack.cli("doctor", "--target", "docs", "--json").stdout)
    [finding] = [f for f in doctor["findings"] if f["check"] == "app_objects"]
    assert finding["level"] == "warn"
    assert {o["name"]: o["action"] for o in finding["details"]["objects"]} == actions
    migrate(stack, "index")

    # The swap refuses up front, naming each with its definition as Postgres prints it.
    out = refused(stack, "swap", *SENSITIVE, "ORDER BY (docs.embedding <=> nearest_doc.q)",
                  "DROP FUNCTION public.nearest_doc(q vector)", "DROP VIEW public.docs_near")
    assert "docs_vectors" not in out
    with stack.connect() as conn:
        # The safety net run after each re-creation in the swap's transaction: a definition
        # that casts the column itself fails the swap; a pass-through one does not.
        conn.execute("CREATE VIEW docs_cast AS SELECT id, embedding::halfvec AS h FROM docs")
        found = {o.name: o for o in app_catalog.dependents(
            conn, sql.Identifier("public", "docs"), ["embedding"])}
        with pytest.raises(MigrationError, match="casts embedding itself"):
            type_change.check_recreated(conn, found["public.docs_cast"], "halfvec(384)",
                                        "vector(384)")
        type_change.check_recreated(conn, found["public.docs_vectors"], "halfvec(384)",
                                    "vector(384)")
        conn.execute("DROP VIEW docs_cast")
        conn.execute("DROP FUNCTION nearest_doc(vector)")
        conn.execute("DROP VIEW docs_near")

    swapped = json_document(migrate(stack, "swap", "--json", "--timeout", "60"))
    assert {o["name"]: o["action"] for o in swapped["app_objects"]} == {
        "public.docs_vectors": "recreate"}
    assert column_type(stack, "embedding") == "halfvec(384)"
    migrate(stack, "rollback", "--timeout", "60")
    assert column_type(stack, "embedding") == "vector(384)"
    # The pass-through view reads the live column again, as it was written: no cast.
    assert definition(stack) == before
    with stack.connect() as conn:
        row = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                           " WHERE attrelid = 'docs_vectors'::regclass"
                           " AND attname = 'embedding'").fetchone()
        assert row == ("vector(384)",)
        same = conn.execute("SELECT count(*) FROM docs_vectors v JOIN docs d USING (id)"
                            " WHERE v.embedding = d.embedding").fetchone()
        assert same == (30,)
