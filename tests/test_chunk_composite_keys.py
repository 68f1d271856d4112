"""Chunked targets whose parent has a two-column primary key (tenant text, id bigint).

The chunk table carries both key columns (pgai's layout), the dirty and gone tables one
column each (`pgr_pk_tenant`, `pgr_pk_id`), and every join, mark, trigger and search
groups by both. Parents share ids across tenants, so a join or a grouping on one column
only would mix them (and these tests would see it).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg import sql

from pgreembed.chunking.stage import run_chunk_stage
from pgreembed.config import load_settings
from pgreembed.operations.chunk_search import search_parents
from pgreembed.store.chunk_counts import chunk_counts, delete_orphans_sql, orphan_chunks
from pgreembed.store.pool import connect
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from tests.app_side import app_transactions, repeatable_read_by_default
from tests.chunk_corpus import long_document
from tests.chunk_load import body, create_chunk_app_objects, pending, wrong_vectors
from tests.helpers import (
    OrdinaryRoles,
    Stack,
    migrate,
    steady_writer,
    wait_for,
    write_config,
)
from tests.test_chunk_search import MODEL, fill_vectors
from tests.test_chunked_targets import (
    chunk_columns,
    chunk_sets,
    chunked_stack,
    drain,
    expected,
    init,
    old_snapshot,
)
from tests.test_rechunk_migration import NEW, OLD

KEY = ("tenant", "id")
VIEW = '[target.destination]\nview = "docs_view"\n'


def composite_docs(stack: Stack) -> None:
    """The stack's docs table keyed by (tenant, id) instead of id: tenant first, so the
    key's order is not the columns' order."""
    with stack.connect() as conn:
        conn.execute("ALTER TABLE docs ADD COLUMN tenant text NOT NULL DEFAULT 'acme',"
                     " DROP CONSTRAINT docs_pkey, ADD PRIMARY KEY (tenant, id)")


def marks(conn: psycopg.Connection, table: str = "chunk_dirty_docs") -> set[tuple[Any, ...]]:
    return set(conn.execute(sql.SQL("SELECT pgr_pk_tenant, pgr_pk_id FROM {}").format(
        sql.Identifier("pgreembed", table))))


def test_two_column_key_through_init_triggers_stage_view_and_counts(stack: Stack) -> None:
    chunked_stack(stack, destination=VIEW)
    composite_docs(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (tenant, id, title, body) VALUES ('a', 1, 'A1', %s),"
                     " ('b', 1, 'B1', 'short b'), ('a', 2, 'A2', 'short a2')",
                     (long_document(),))
    target = init(stack)
    with stack.connect() as conn:
        assert chunk_columns(conn) == [("embedding_uuid", "uuid", True), ("tenant", "text", True),
                           ("id", "bigint", True), ("chunk_seq", "integer", True),
                           ("chunk", "text", True), ("embedding", "vector(384)", False)]
        assert conn.execute("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE"
                            " conrelid = 'docs_chunks'::regclass AND contype = 'u'"
                            ).fetchall() == [("UNIQUE (tenant, id, chunk_seq)",)]
        assert marks(conn) == {("a", 1), ("b", 1), ("a", 2)}
    init(stack)  # again: nothing changes, no second mark
    drain(stack.dsn, target)
    with stack.connect() as conn:
        sets = chunk_sets(conn, KEY)
        assert sets == expected(conn, target, KEY) and len(sets[("a", 1)]) >= 40
        assert sets[("b", 1)] == ["B1: short b"] and marks(conn) == set()
        conn.execute("UPDATE docs SET views = views + 1")  # not a text column: no mark
        assert marks(conn) == set()
        conn.execute("UPDATE docs SET body = 'b edited' WHERE tenant = 'b' AND id = 1")
        assert marks(conn) == {("b", 1)}  # not ('a', 1), which shares the id
    drain(stack.dsn, target)
    with stack.connect() as conn:
        assert chunk_sets(conn, KEY) == {**sets, ("b", 1): ["B1: b edited"]}
        moved = {r[0] for r in conn.execute("SELECT embedding_uuid FROM docs_chunks"
                                            " WHERE tenant = 'a' AND id = 1")}
        # One column of the key changes: the chunks move with it (same rows), no mark.
        conn.execute("UPDATE docs SET tenant = 'c' WHERE tenant = 'a' AND id = 1")
        assert {r[0] for r in conn.execute("SELECT embedding_uuid FROM docs_chunks"
                                           " WHERE tenant = 'c' AND id = 1")} == moved
        assert marks(conn) == set()
        # pgai's view joins on both columns: one row per chunk, with its own parent.
        rows = conn.execute("SELECT tenant, id, title, chunk FROM docs_view").fetchall()
        assert len(rows) == len(moved) + 2
        assert all(chunk.startswith(f"{title}: ") for _, _, title, chunk in rows)
        conn.execute("DELETE FROM docs WHERE tenant = 'b'")  # ('a'|'c', 1) keep theirs
        assert set(chunk_sets(conn, KEY)) == {("c", 1), ("a", 2)}
        counts = chunk_counts(conn, target)
        assert (counts.parents, counts.chunks) == (2, len(moved) + 1)
        # A chunk of ('c', 2): neither column alone is missing from docs, the pair is.
        conn.execute("INSERT INTO docs_chunks (tenant, id, chunk_seq, chunk)"
                     " VALUES ('c', 2, 0, 'orphan')")
        assert orphan_chunks(conn, target) == 1
        conn.execute(delete_orphans_sql(conn, target))
        assert orphan_chunks(conn, target) == 0
        conn.execute("TRUNCATE docs")
        assert chunk_sets(conn, KEY) == {} and marks(conn) == set()


def test_repeatable_read_delete_and_truncate_leave_two_column_gone_marks(stack: Stack
                                                                        ) -> None:
    """A REPEATABLE READ snapshot older than the chunk sets: the triggers record the keys
    (both columns; NULL for a TRUNCATE) and the stage sweeps the chunks left."""
    chunked_stack(stack)
    composite_docs(stack)
    target = init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (tenant, id, title, body) VALUES ('a', 1, 'a', 'x'),"
                     " ('b', 1, 'b', 'y'), ('a', 2, 'c', 'z')")
    with old_snapshot(stack.dsn) as app:
        drain(stack.dsn, target)
        app.execute("DELETE FROM docs WHERE tenant = 'a' AND id = 1")
    with stack.connect() as conn:
        assert marks(conn, "chunk_gone_docs") == {("a", 1)}
        report = run_chunk_stage(conn, load_settings(stack.config_path, stack.env))
        assert report.removed == 1
        assert chunk_sets(conn, KEY) == {("b", 1): ["b: y"], ("a", 2): ["c: z"]}
    with old_snapshot(stack.dsn) as app:
        with stack.connect() as conn:
            conn.execute("UPDATE docs SET body = 'y2' WHERE tenant = 'b'")
        drain(stack.dsn, target)
        app.execute("TRUNCATE docs")
    with stack.connect() as conn:
        assert marks(conn, "chunk_gone_docs") == {(None, None)}
        run_chunk_stage(conn, load_settings(stack.config_path, stack.env))
        assert chunk_sets(conn, KEY) == {} and marks(conn) == set()
        assert marks(conn, "chunk_gone_docs") == set()


def test_search_parents_returns_distinct_two_column_keys_as_tuples(stack: Stack) -> None:
    settings = chunked_stack(stack)
    composite_docs(stack)
    target = init(stack)
    with stack.connect() as conn:
        for tenant in ("a", "b", "c"):  # the same ids (and texts) in every tenant
            conn.execute("INSERT INTO docs (tenant, id, title, body) SELECT %s, g, %s || g,"
                         " %s FROM generate_series(1, 4) g",
                         (tenant, tenant, long_document()[:3000]))
    drain(stack.dsn, target)
    with stack.connect() as conn:
        fill_vectors(conn)
        query = conn.execute("SELECT chunk FROM docs_chunks WHERE tenant = 'b' AND id = 3"
                             " AND chunk_seq = 1").fetchone()[0]
        q = fake_vector(MODEL, query, 384)
        best: dict[tuple[str, int], float] = {}
        for tenant, key, vector in conn.execute("SELECT tenant, id, embedding FROM docs_chunks"):
            v = vector.to_numpy()
            d = 1 - float(np.dot(q, v) / (np.linalg.norm(q) * np.linalg.norm(v)))
            best[(tenant, key)] = min(d, best.get((tenant, key), 2.0))
    with connect(stack.dsn, autocommit=True) as app:
        hits = search_parents(app, settings, "docs", query, limit=20, index_settings={})
    keys = [h.key for h in hits]
    assert len(keys) == len(set(keys)) == 12  # every parent once, not every id once
    assert set(keys) == set(best) and all(isinstance(k, tuple) for k in keys)
    assert hits[0].key == ("b", 3) and hits[0].chunk == query and hits[0].distance < 1e-5
    for hit in hits:  # each parent's nearest chunk
        assert hit.distance == pytest.approx(best[hit.key], abs=1e-5)


def test_rechunk_migration_makes_a_second_set_keyed_by_both_columns(stack: Stack) -> None:
    """`migrate start --rechunk` marks every parent by both columns in the new set's dirty
    table, the stage fills it with the new settings, and a key update moves the chunks of
    both sets (each set's triggers)."""
    write_config(stack.config_path, OLD)
    composite_docs(stack)
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (tenant, id, title, body) SELECT t, g, t || g, b FROM"
                     " unnest(%s::text[]) WITH ORDINALITY AS u(b, g), unnest(ARRAY['a', 'b'])"
                     " AS t", ([body(k, 0) for k in range(1, 4)],))
    with connect(stack.dsn) as conn:
        run_chunk_stage(conn, load_settings(stack.config_path, stack.env))
    write_config(stack.config_path, NEW)
    settings = load_settings(stack.config_path, stack.env)
    migrate(stack, "start", "--rechunk")
    with stack.connect() as conn:
        (slot,) = conn.execute("SELECT id FROM pgreembed.slots WHERE role = 'next'").fetchone()
        assert marks(conn, f"chunk_dirty_docs__c{slot}") == {
            (t, k) for t in ("a", "b") for k in range(1, 4)}
    with connect(stack.dsn) as conn:
        run_chunk_stage(conn, settings)
    table = f"docs_chunks__c{slot}"
    with stack.connect() as conn:
        new = chunk_sets(conn, KEY, table)
        assert new == expected(conn, settings.target("docs"), KEY) and len(new) == 6
        assert new != chunk_sets(conn, KEY)  # the live set keeps its settings
        conn.execute("UPDATE docs SET tenant = 'c' WHERE tenant = 'a' AND id = 1")
        for chunks in (chunk_sets(conn, KEY), chunk_sets(conn, KEY, table)):
            assert ("c", 1) in chunks and ("a", 1) not in chunks and ("b", 1) in chunks
        assert marks(conn, f"chunk_dirty_docs__c{slot}") == set()


def settled(stack: Stack, target: Any) -> bool:
    with stack.connect() as conn:
        return (pending(conn, ["embedding"]) == 0
                and chunk_sets(conn, KEY) == expected(conn, target, KEY))


PARENTS = 24


@pytest.mark.timeout(300)
def test_composite_key_pipeline_as_ordinary_role_under_app_load(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    """Scheduler (chunk stage) + worker as the ordinary role under a REPEATABLE READ
    default, a slowed provider, a concurrent writer, app transactions holding parents, and
    the app's view and BEGIN ATOMIC function on the chunk table's vector column."""
    stack, roles = ordinary_roles
    settings = chunked_stack(stack, batch_size=16, destination=VIEW)
    target = settings.target("docs")
    composite_docs(stack)
    repeatable_read_by_default(stack)
    with stack.connect() as conn:  # tenants t0..t2; the writer's inserts are 'acme'
        conn.execute("INSERT INTO docs (tenant, id, title, body) SELECT 't' || (g %% 3), g,"
                     " 't' || g, b FROM unnest(%s::text[]) WITH ORDINALITY AS u(b, g)",
                     ([body(k, 0) for k in range(1, PARENTS + 1)],))
    out = stack.cli("init")
    assert out.returncode == 0, out.stderr
    fake_openai.set_faults(latency=0.2)  # slowed: the stage and the writes race the edits
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_for(lambda: settled(stack, target), timeout=120, interval=0.5,
             message="first chunk sets embedded")
    create_chunk_app_objects(stack, roles)
    held = range(1, PARENTS // 3 + 1)  # 8 parents: two for each of the 4 app sessions
    with steady_writer(stack, per_second=8, edits=range(PARENTS // 3 + 1, PARENTS + 1)
                       ) as writes, app_transactions(roles.app_dsn, held) as holders:
        wait_for(lambda: writes["edits"] >= 30, timeout=60, message="the writer's edits")
    fake_openai.set_faults(latency=0.0)
    wait_for(lambda: settled(stack, target), timeout=120, interval=0.5,
             message="every chunk set current and embedded")
    with stack.connect() as conn:
        sets = chunk_sets(conn, KEY)
        assert sets == expected(conn, target, KEY)
        shared = {k for k in sets if k[0] == "acme" and (f"t{k[1] % 3}", k[1]) in sets}
        assert shared, "the writer's parents share ids with the seeded ones"
        assert wrong_vectors(conn, {"embedding": (MODEL, 384)}) == {"embedding": 0}
        assert conn.execute("SELECT count(*) FROM pgreembed.chunk_gone_docs").fetchone() == (0,)
    with psycopg.connect(roles.app_dsn, autocommit=True) as app:
        base = dict(app.execute("SELECT embedding_uuid, embedding::text FROM docs_chunks"))
        view = dict(app.execute("SELECT embedding_uuid, embedding::text FROM chunk_search"))
        function = dict(app.execute("SELECT embedding_uuid, chunk_embedding(embedding_uuid)"
                                    "::text FROM docs_chunks"))
        joined = app.execute("SELECT count(*) FROM docs_view").fetchone()
    assert base and view == base and function == base and joined == (len(base),)
    assert writes["errors"] == 0 and holders.errors == [] and holders.done > 0
    with connect(stack.dsn, autocommit=True) as conn:
        query = sets[("t1", 1)][2]
        hits = search_parents(conn, settings, "docs", query, limit=5, index_settings={})
    assert hits[0].key == ("t1", 1) and hits[0].chunk == query
    print(json.dumps({"parents": len(sets), "chunks": len(base), "edits": writes["edits"],
                      "app_transactions": holders.done, "held_s": holders.held,
                      "inputs": fake_openai.stats()["inputs_embedded"]}))
