"""The app's own objects over the vector column through a whole migration.

A view, a materialized view, a BEGIN ATOMIC function, an RLS policy and two publications
read `docs.embedding`; Postgres binds them by attribute number, and a swap exchanges the
columns' names. Through plan, start, swap, rollback, swap and finalize (the swaps under a
steady writer with a slowed provider, the model changing dimensions 384 -> 512 so views
are dropped and created again), each object either serves the live model's vector for
each row's current text, or the step was refused up front naming it, with nothing changed.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgreembed.config import load_settings
from pgreembed.migrations import rebind
from pgreembed.store.slots import load_slots
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vectors
from tests.helpers import (
    Stack,
    column_type,
    docs_config,
    in_background,
    json_document,
    migrate,
    new_column,
    rows_in_flight,
    seed,
    start_migration,
    steady_writer,
    wait_filled,
    wait_for,
    wait_landed,
    write_config,
)

OLD, NEW = ("fake-384", 384), ("fake-512", 512)
ROLES = ("ao_view_owner", "ao_reader", "ao_table_owner", "ao_reembed", "ao_default")

APP_OBJECTS = """
CREATE VIEW docs_search WITH (security_barrier = true)
    AS SELECT id, title, body, embedding FROM docs;
COMMENT ON VIEW docs_search IS 'what the app searches';
COMMENT ON COLUMN docs_search.embedding IS 'the live model''s vector';
GRANT SELECT ON docs TO ao_view_owner;
ALTER VIEW docs_search OWNER TO ao_view_owner;
GRANT SELECT ON docs_search TO ao_reader;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO ao_default;
CREATE VIEW docs_distance WITH (security_invoker = true) AS SELECT id,
    embedding <=> (SELECT embedding FROM docs ORDER BY id LIMIT 1) AS distance FROM docs;
CREATE MATERIALIZED VIEW docs_snapshot AS SELECT id, embedding FROM docs;
CREATE UNIQUE INDEX docs_snapshot_id ON docs_snapshot (id);
CREATE FUNCTION doc_embedding(k bigint) RETURNS vector LANGUAGE sql STABLE
    BEGIN ATOMIC SELECT embedding FROM docs WHERE id = k; END;
ALTER TABLE docs ENABLE ROW LEVEL SECURITY;
CREATE POLICY embedded_rows ON docs FOR SELECT USING (embedding IS NOT NULL);
CREATE PUBLICATION docs_all FOR TABLE docs;
CREATE PUBLICATION docs_columns FOR TABLE docs (id, title, body, embedding);
"""


def create_roles(conn: psycopg.Connection) -> None:
    for role in ROLES:  # roles are the server's: another test may have made them
        conn.execute(f"DO $$ BEGIN CREATE ROLE {role} LOGIN;"
                     " EXCEPTION WHEN duplicate_object THEN NULL; END $$")


def serves(conn: psycopg.Connection, model: tuple[str, int]) -> dict[str, int]:
    """Through the view and the function: each vector is `model`'s for the row's text
    (NULL: pending, just edited). Returns how many vectors each served."""
    name, dims = model
    served = {}
    for obj, query in (("view", "SELECT id, concat_ws(E'\\n', title, body), embedding::text"
                                " FROM docs_search ORDER BY id"),
                       ("function", "SELECT id, concat_ws(E'\\n', title, body),"
                                    " doc_embedding(id)::text FROM docs ORDER BY id")):
        rows = [r for r in conn.execute(query).fetchall() if r[2] is not None]
        want = fake_vectors(name, [text for _, text, _ in rows], dims)
        for (key, text, vector), expected in zip(rows, want, strict=True):
            got = np.array([float(x) for x in vector.strip("[]").split(",")], np.float32)
            assert got.shape == expected.shape, f"{obj} row {key}: {got.shape} not {name}"
            np.testing.assert_allclose(got, expected, atol=2e-3,
                                       err_msg=f"{obj} row {key}: not {name}({text!r})")
        served[obj] = len(rows)
    assert min(served.values()) >= 150, served
    # A view with no vector column is replaced in place (CREATE OR REPLACE VIEW).
    differ = conn.execute(
        "SELECT count(*) FROM docs_distance v JOIN docs d USING (id) WHERE v.distance IS"
        " DISTINCT FROM d.embedding <=> (SELECT embedding FROM docs ORDER BY id LIMIT 1)"
        ).fetchone()
    assert differ == (0,)
    return served


def bound_columns(conn: psycopg.Connection) -> dict[str, set[str]]:
    """The vector columns each object reads, by the attribute numbers Postgres recorded."""
    rows = conn.execute(
        """
        SELECT CASE WHEN d.classid = 'pg_rewrite'::regclass
                    THEN (SELECT ev_class::regclass::text FROM pg_rewrite WHERE oid = d.objid)
                    ELSE pg_describe_object(d.classid, d.objid, 0) END, a.attname
        FROM pg_depend d JOIN pg_attribute a ON a.attrelid = d.refobjid
             AND a.attnum = d.refobjsubid
        WHERE d.refobjid = 'docs'::regclass AND a.attname LIKE 'embedding%%'
          AND d.classid IN ('pg_rewrite'::regclass, 'pg_proc'::regclass,
                            'pg_policy'::regclass)
        """).fetchall()
    found: dict[str, set[str]] = {}
    for obj, column in rows:
        found.setdefault(obj, set()).add(column)
    return found


def assert_on_live(conn: psycopg.Connection, model: tuple[str, int]) -> None:
    served = serves(conn, model)
    bound = bound_columns(conn)
    assert bound == {k: {"embedding"} for k in bound} and len(bound) >= 4, bound
    options = conn.execute("SELECT reloptions FROM pg_class WHERE relname = 'docs_distance'"
                           ).fetchone()
    assert options == (["security_invoker=true"],)
    assert served


def assert_view_kept(stack: Stack, dims: int) -> None:
    """The re-created view kept its options, owner, grants and comments."""
    assert column_type_of(stack, "docs_search", "embedding") == f"vector({dims})"
    with stack.connect() as conn:
        row = conn.execute(
            "SELECT pg_get_userbyid(relowner), reloptions,"
            " has_table_privilege('ao_reader', oid, 'SELECT')"
            " AND NOT has_table_privilege('ao_default', oid, 'SELECT'),"
            " obj_description(oid, 'pg_class'), col_description(oid, 4)"
            " FROM pg_class WHERE oid = 'docs_search'::regclass").fetchone()
    assert row == ("ao_view_owner", ["security_barrier=true"], True, "what the app searches",
                   "the live model's vector")


def column_type_of(stack: Stack, relation: str, column: str) -> str:
    with stack.connect() as conn:
        row = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
                           " WHERE attrelid = %s::regclass AND attname = %s",
                           (relation, column)).fetchone()
    assert row is not None
    return str(row[0])


def refused(stack: Stack, step: str, *names: str, env: dict[str, str] | None = None) -> str:
    before = slot_columns(stack)
    result = (stack.cli if env is None else _cli_as(stack, env))(
        "migrate", step, "--target", "docs",
        *(("--timeout", "60") if step in ("swap", "rollback") else ()))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for name in names:
        assert name in result.stderr, (name, result.stderr)
    assert slot_columns(stack) == before  # nothing changed
    return result.stderr


def _cli_as(stack: Stack, env: dict[str, str]):  # type: ignore[no-untyped-def]
    def run(*args: str) -> Any:
        import subprocess
        import sys

        from tests.helpers import ROOT
        return subprocess.run([sys.executable, "-m", "pgreembed", *args], env=env,
                              capture_output=True, text=True, timeout=120, cwd=ROOT)
    return run


def slot_columns(stack: Stack) -> list[tuple[str, str, str]]:
    with stack.connect() as conn:
        return [tuple(r) for r in conn.execute(
            "SELECT s.role, s.vector_column, m.key FROM pgreembed.slots s JOIN pgreembed.models"
            " m ON m.id = s.model_id WHERE s.role <> 'dropped' ORDER BY s.role").fetchall()]


def swap_under_load(stack: Stack, fake: FakeOpenAIServer, step: str, slow: str
                    ) -> dict[str, Any]:
    """`step` under a steady writer, with the provider slowed and the app reading its view
    all the while (the swap locks the view before the table, as the app's queries do)."""
    reads = {"ok": 0, "errors": 0}

    def read_view(stop: threading.Event) -> None:
        with psycopg.connect(stack.dsn, autocommit=True, prepare_threshold=None) as conn:
            while not stop.is_set():
                try:
                    conn.execute("SELECT count(*), max(vector_dims(embedding))"
                                 " FROM docs_search").fetchone()
                    reads["ok"] += 1
                except psycopg.Error as exc:
                    reads["errors"] += 1
                    reads.setdefault("last", str(exc))  # type: ignore[arg-type]
                stop.wait(0.005)

    fake.set_faults(slow_model=slow, slow_model_latency=0.5)
    with steady_writer(stack, per_second=10.0) as writes, in_background(read_view):
        wait_for(lambda: reads["ok"] > 0 and rows_in_flight(stack, slow) > 0, timeout=30,
                 message=f"the app reading and batches of the slowed {slow} in flight")
        doc = json_document(migrate(stack, step, "--json", "--timeout", "60"))
        # The app keeps on while the batches of the slowed model land after the step.
        wait_landed(stack, slow, time.time(),
                    also=lambda: writes["edits"] > 5 and reads["ok"] > 50)
    assert writes["edits"] > 5 and writes["errors"] == 0
    assert reads["ok"] > 50 and reads["errors"] == 0, reads
    fake.set_faults(slow_model=None, slow_model_latency=0.0)
    wait_filled(stack, "embedding")
    return doc


@pytest.mark.second_server
def test_views_functions_policies_follow_the_live_column_through_a_migration(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    write_config(stack.config_path, docs_config(batch_size=16, max_inflight_rows=128))
    seed(stack, 200)
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        create_roles(conn)
        conn.execute(APP_OBJECTS)
        conn.execute("CREATE INDEX docs_embedding_idx ON docs USING hnsw"
                     " (embedding vector_cosine_ops)")
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    with stack.connect() as conn:
        assert_on_live(conn, OLD)

    # plan and doctor list every object with what the swap will do, and the publication.
    plan = json_document(migrate(stack, "plan", "--model", NEW[0], "--dimensions", "512",
                                 "--json"))
    actions = {o["name"]: o["action"] for o in plan["app_objects"]}
    assert actions == {"public.docs_search": "recreate", "public.docs_snapshot": "refuse",
                       "public.docs_distance": "rebind",
                       "public.doc_embedding(k bigint)": "rebind",
                       "embedded_rows on public.docs": "rebind", "docs_columns": "refuse"}
    assert any("docs_all" in note and "subscriber" in note for note in plan["notes"])
    doctor = json_document(stack.cli("doctor", "--target", "docs", "--json").stdout)
    found = {f["check"]: f for f in doctor["findings"]}
    assert {o["name"] for o in found["app_objects"]["details"]["objects"]} == set(actions)
    assert found["publications"]["level"] == "warn"
    started = migrate(stack, "start", "--model", NEW[0], "--dimensions", "512")
    assert "public.docs_snapshot" in started and "public.docs_search" in started
    column = new_column(stack)
    wait_filled(stack, column)
    migrate(stack, "index")

    # The swap refuses up front what it cannot keep on the column, naming each: a view
    # over the view it must re-create (the type changes) too.
    with stack.connect() as conn:
        conn.execute("CREATE VIEW docs_search_top AS SELECT id, embedding FROM docs_search")
    out = refused(stack, "swap", "public.docs_snapshot", "docs_columns",
                  "DROP MATERIALIZED VIEW", "public.docs_search ", "docs_search_top",
                  # its definition as the server prints it (PostgreSQL 15 qualifies
                  # the columns: `SELECT docs.id,`; 16 and later do not)
                  "CREATE MATERIALIZED VIEW public.docs_snapshot AS",
                  "CREATE UNIQUE INDEX docs_snapshot_id ON public.docs_snapshot")
    assert "public.docs_distance" not in out  # kept in place: not refused
    with stack.connect() as conn:
        assert_on_live(conn, OLD)
        conn.execute("DROP VIEW docs_search_top")
        conn.execute("DROP MATERIALIZED VIEW docs_snapshot")
        conn.execute("ALTER PUBLICATION docs_columns SET TABLE docs (id, title, body)")

    swapped = swap_under_load(stack, fake_openai, "swap", OLD[0])
    assert {o["name"]: o["action"] for o in swapped["app_objects"]} == {
        "public.docs_search": "recreate", "public.doc_embedding(k bigint)": "rebind",
        "embedded_rows on public.docs": "rebind", "public.docs_distance": "rebind"}
    with stack.connect() as conn:
        assert_on_live(conn, NEW)
    assert_view_kept(stack, 512)

    # pgreembed as an ordinary role, member of the table's owner role: the view's owner
    # is another role, so the rollback is refused up front with the grant it needs.
    with stack.connect() as conn:
        conn.execute("GRANT ao_table_owner TO ao_reembed")
        conn.execute("ALTER TABLE docs OWNER TO ao_table_owner")
        conn.execute("GRANT USAGE ON SCHEMA pgreembed TO ao_reembed")
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA pgreembed TO ao_reembed")
        conn.execute("CREATE MATERIALIZED VIEW docs_snapshot AS SELECT id, embedding FROM docs")
    as_role = {**stack.env, "DATABASE_URL": make_conninfo(stack.dsn, user="ao_reembed")}
    refused(stack, "rollback", "public.docs_search", 'GRANT "ao_view_owner" TO "ao_reembed"',
            "public.docs_snapshot", env=as_role)
    refused(stack, "rollback", "public.docs_snapshot")
    with stack.connect() as conn:
        conn.execute("DROP MATERIALIZED VIEW docs_snapshot")

    swap_under_load(stack, fake_openai, "rollback", NEW[0])
    with stack.connect() as conn:
        assert_on_live(conn, OLD)
    assert_view_kept(stack, 384)

    swap_under_load(stack, fake_openai, "swap", OLD[0])
    with stack.connect() as conn:
        assert_on_live(conn, NEW)
        # An app object reading the previous column by name: finalize names it, drops nothing.
        conn.execute(f"CREATE VIEW old_model AS SELECT id, {column} FROM docs")
    warned = json_document(stack.cli("doctor", "--target", "docs", "--json").stdout)
    [finding] = [f for f in warned["findings"] if f["check"] == "app_objects"]
    assert finding["level"] == "warn" and f"public.old_model reads {column}" in finding[
        "message"], finding
    out = refused(stack, "finalize", "public.old_model")
    assert "CASCADE" not in out
    with stack.connect() as conn:
        conn.execute("DROP VIEW old_model")
    migrate(stack, "finalize")
    assert column_type(stack, column) is None
    assert_view_kept(stack, 512)
    with stack.connect() as conn:
        assert_on_live(conn, NEW)
        conn.execute("CREATE MATERIALIZED VIEW docs_snapshot AS SELECT id, embedding FROM docs")
        assert bound_columns(conn)["docs_snapshot"] == {"embedding"}


KEPT_OFF = """
ALTER TABLE docs ADD COLUMN dims integer GENERATED ALWAYS AS (vector_dims(embedding)) STORED;
ALTER TABLE docs ADD CONSTRAINT unit_vectors CHECK (embedding IS NULL
    OR abs(vector_norm(embedding) - 1) < 0.01);
CREATE FUNCTION keep_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER on_vector BEFORE UPDATE OF embedding ON docs FOR EACH ROW
    WHEN (NEW.embedding IS NOT NULL) EXECUTE FUNCTION keep_row();
CREATE TABLE vector_log (id bigint, embedding vector);
CREATE RULE log_vectors AS ON UPDATE TO docs DO ALSO
    INSERT INTO vector_log VALUES (NEW.id, NEW.embedding);
CREATE FUNCTION plain_sql(k bigint) RETURNS vector LANGUAGE sql
    AS 'SELECT embedding FROM docs WHERE id = k';
"""


def test_what_a_swap_cannot_keep_is_refused_up_front_and_cancel_names_its_readers(
        stack: Stack) -> None:
    """Generated columns, CHECK constraints, triggers naming the column and rules cannot
    be kept on it under the swap's lock: plan lists them, the swap refuses naming each
    before it waits or changes anything (no worker runs: nothing is filled). A plain-string
    SQL function follows the name by itself: not listed. `cancel` names what reads the
    column it would drop instead of cascading."""
    seed(stack, 10)
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        conn.execute(KEPT_OFF)
    plan = json_document(migrate(stack, "plan", "--model", OLD[0] + "-b", "--dimensions",
                                 "384", "--json"))
    assert {(o["kind"], o["name"], o["action"]) for o in plan["app_objects"]} == {
        ("generated column", "public.docs.dims", "refuse"),
        ("constraint", "unit_vectors on public.docs", "refuse"),
        ("trigger", "on_vector on public.docs", "refuse"),
        ("rule", "log_vectors on public.docs", "refuse")}
    column = start_migration(stack, "--model", OLD[0] + "-b", "--dimensions", "384")
    refused(stack, "swap", "public.docs.dims", "unit_vectors on public.docs",
            "on_vector on public.docs", "log_vectors on public.docs", "DROP TRIGGER")
    with stack.connect() as conn:
        conn.execute(f"CREATE VIEW peek AS SELECT id, {column} FROM docs")
    out = refused(stack, "cancel", "view public.peek")
    assert "CASCADE" not in out
    with stack.connect() as conn:
        conn.execute("DROP VIEW peek")
    migrate(stack, "cancel")
    assert column_type(stack, column) is None


ATTACHED = """
CREATE VIEW docs_edit AS SELECT id, title, embedding FROM docs;
CREATE FUNCTION edit_doc() RETURNS trigger LANGUAGE plpgsql AS
    $$ BEGIN UPDATE docs SET title = NEW.title WHERE id = NEW.id; RETURN NEW; END $$;
CREATE TRIGGER docs_edit_write INSTEAD OF UPDATE ON docs_edit FOR EACH ROW
    EXECUTE FUNCTION edit_doc();
CREATE VIEW docs_columns_only AS SELECT id, title, embedding FROM docs;
GRANT SELECT (id, embedding) ON docs_columns_only TO ao_reader;
CREATE FUNCTION doc_norm(k bigint) RETURNS real LANGUAGE sql STABLE
    BEGIN ATOMIC SELECT vector_norm(embedding) FROM docs WHERE id = k; END;
CREATE FUNCTION doc_vector(k bigint) RETURNS vector LANGUAGE sql STABLE
    BEGIN ATOMIC SELECT embedding FROM docs WHERE id = k; END;
"""


def test_a_view_re_created_by_a_type_changing_swap_keeps_what_is_attached_to_it(
        stack: Stack) -> None:
    """DROP VIEW removes a view's INSTEAD OF triggers (and its rules, column defaults)
    silently: a swap that must re-create the view (384 -> 512 dimensions) refuses up front
    naming the trigger. A view's column-level grants are given again. A BEGIN ATOMIC body
    that would not type-check against halfvec is refused before the swap waits."""
    seed(stack, 10)
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        create_roles(conn)
        conn.execute(ATTACHED)
    start_migration(stack, "--derive", "halfvec")
    out = refused(stack, "swap", "public.doc_norm(k bigint)",
                  "vector_norm(halfvec) does not exist")
    assert "doc_vector" not in out  # halfvec -> vector is an assignment cast: it type-checks
    migrate(stack, "cancel")
    plan = json_document(migrate(stack, "plan", "--model", NEW[0], "--dimensions", "512",
                                 "--json"))
    decided = {o["name"]: o for o in plan["app_objects"]}
    assert decided["public.docs_edit"]["action"] == "refuse"
    assert "docs_edit_write" in decided["public.docs_edit"]["detail"]
    assert decided["public.docs_columns_only"]["action"] == "recreate"
    start_migration(stack, "--model", NEW[0], "--dimensions", "512")
    refused(stack, "swap", "public.docs_edit", "trigger docs_edit_write")
    with stack.connect() as conn:
        conn.execute("DROP VIEW docs_edit")
    migrate(stack, "swap", "--timeout", "60")
    assert column_type_of(stack, "docs_columns_only", "embedding") == "vector(512)"
    with stack.connect() as conn:
        row = conn.execute(
            "SELECT has_column_privilege('ao_reader', 'docs_columns_only', 'embedding',"
            " 'SELECT'), has_column_privilege('ao_reader', 'docs_columns_only', 'title',"
            " 'SELECT')").fetchone()
    assert row == (True, False)

    # Under the swap's lock only one query verifies that the objects decided for before
    # waiting are still those: one that came in between makes the attempt start again.
    target = load_settings(stack.config_path, env=stack.env).target("docs")
    with psycopg.connect(stack.dsn) as conn:
        live, old = sorted((s for s in load_slots(conn, target) if s.role != "dropped"),
                           key=lambda s: s.role != "live")
        checked = rebind.check(conn, live, old, "rollback")
        conn.execute(f"CREATE VIEW came_late AS SELECT id, {old.vector_column} FROM docs")
        with pytest.raises(rebind.ObjectsChanged):
            rebind.capture(conn, live, old, checked)
        conn.rollback()
