"""Chunked targets through their lifecycle: a model migration of the chunk table, ordinary
roles under REPEATABLE READ, and searches during edits (scheduler + Redis + worker)."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import psycopg
import pytest
from psycopg import sql

from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from tests.chunk_load import CHUNK_APP_OBJECTS, chunk_app_objects_off_live
from tests.helpers import OrdinaryRoles, Stack, migrate, new_column, wait_for
from tests.test_chunked_pipeline import MODEL, body, running_with_parents, settled
from tests.test_chunked_targets import chunk_sets, chunked_stack, expected


def assert_chunks_current(stack: Stack, target: object, column: str, model: str,
                          dims: int) -> None:
    with stack.connect() as conn:
        assert chunk_sets(conn) == expected(conn, target)
        rows = conn.execute(f"SELECT chunk, {column} FROM docs_chunks").fetchall()
    assert rows
    for text, vector in rows:
        assert vector is not None, f"chunk {text[:40]!r}: no vector in {column}"
        np.testing.assert_allclose(vector.to_numpy(), fake_vector(model, text, dims),
                                   atol=1e-6, err_msg=f"{column} of {text[:40]!r}")


def assert_view_current(stack: Stack, model: str, dims: int) -> None:
    """pgai's view (chunk columns + the parent's) serves the live column's model, and so do
    the app's own view and SQL function on the chunk table's vector column."""
    with stack.connect() as conn:
        rows = conn.execute("SELECT chunk, embedding, title, id FROM docs_view").fetchall()
        chunks = conn.execute("SELECT count(*) FROM docs_chunks").fetchone()[0]
        assert chunk_app_objects_off_live(conn) == {"view": 0, "function": 0}
    assert len(rows) == chunks > 0
    for text, vector, title, key in rows:
        assert text.startswith(f"{title}: ") and title == f"t{key}"
        np.testing.assert_allclose(vector.to_numpy(), fake_vector(model, text, dims),
                                   atol=1e-6, err_msg=f"docs_view row of {text[:40]!r}")


@pytest.mark.timeout(300)
def test_model_migration_of_the_chunk_table_swaps_and_rolls_back(stack: Stack) -> None:
    """The existing migration lifecycle (start, fill, index, swap, rollback, finalize) on a
    chunk table, with parents edited during the fill and after the swap; pgai's view and
    the app's own view and BEGIN ATOMIC function on the chunk vector column serve the
    live column after each swap, the rollback and finalize."""
    settings = chunked_stack(stack, batch_size=32,
                             destination='[target.destination]\nview = "docs_view"\n')
    target = settings.target("docs")
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:  # the app's own view and function on the vector column
        conn.execute(CHUNK_APP_OBJECTS)
    stack.start_worker(threads=4)
    stack.start_scheduler()
    with stack.connect() as conn:
        for key in range(1, 41):
            conn.execute("INSERT INTO docs (id, title, body) VALUES (%s, %s, %s)",
                         (key, f"t{key}", body(random.Random(key), key, "0")))
    wait_for(lambda: settled(stack, target), timeout=120, message="chunks embedded")
    migrate(stack, "start", "--model", "fake-768", "--dimensions", "768")
    column = new_column(stack)
    with stack.connect() as conn:
        for key in range(1, 11):
            conn.execute("UPDATE docs SET body = %s WHERE id = %s",
                         (body(random.Random(key), key, "1"), key))
        conn.execute("DELETE FROM docs WHERE id = 40")

    def both_filled() -> bool:
        with stack.connect() as conn:
            left = conn.execute(f"SELECT count(*) FROM docs_chunks WHERE embedding IS NULL"
                                f" OR {column} IS NULL").fetchone()
        return left == (0,) and settled(stack, target)
    wait_for(both_filled, timeout=120, interval=0.5, message="both columns filled")
    migrate(stack, "index")
    assert "swap done" in migrate(stack, "swap")
    with stack.connect() as conn:
        for key in range(11, 16):
            conn.execute("UPDATE docs SET body = %s WHERE id = %s",
                         (body(random.Random(key), key, "2"), key))
    wait_for(both_filled, timeout=120, interval=0.5, message="filled after the swap")
    assert_chunks_current(stack, target, "embedding", "fake-768", 768)
    assert_chunks_current(stack, target, column, "fake-384", 384)
    assert_view_current(stack, "fake-768", 768)
    assert "rollback done" in migrate(stack, "rollback")
    assert_chunks_current(stack, target, "embedding", "fake-384", 384)
    assert_view_current(stack, "fake-384", 384)
    assert "swap done" in migrate(stack, "swap")
    migrate(stack, "finalize")
    assert_chunks_current(stack, target, "embedding", "fake-768", 768)
    assert_view_current(stack, "fake-768", 768)


@pytest.mark.timeout(300)
def test_as_ordinary_roles_under_repeatable_read(
        ordinary_roles: tuple[Stack, OrdinaryRoles], fake_openai: FakeOpenAIServer) -> None:
    """pgreembed as a plain member of the table owner's role, the app as a role with only
    DML on its table, the database's default isolation REPEATABLE READ, and an app
    transaction holding a parent row while the stage runs: the app's inserts, edits,
    deletes and TRUNCATE work, and every chunk set ends current and embedded."""
    stack, roles = ordinary_roles
    settings = chunked_stack(stack, batch_size=16)
    target = settings.target("docs")
    with psycopg.connect(stack.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_isolation ="
                              " 'repeatable read'").format(sql.Identifier(admin.info.dbname)))
    out = stack.cli("init")
    assert out.returncode == 0, out.stderr
    fake_openai.set_faults(slow_model=MODEL, slow_model_latency=0.5)
    stack.start_worker(threads=4)
    stack.start_scheduler()
    with psycopg.connect(roles.app_dsn, autocommit=True) as app:
        assert app.execute("SHOW transaction_isolation").fetchone() == ("repeatable read",)
        for key in range(1, 61):
            app.execute("INSERT INTO docs (id, title, body) VALUES (%s, %s, %s)",
                        (key, f"t{key}", body(random.Random(key), key, "0")))
        with psycopg.connect(roles.app_dsn) as holder:  # holds parent 5 a while
            holder.execute("UPDATE docs SET views = views + 1 WHERE id = 5")
            for key in [k for k in range(1, 41) if k != 5]:
                app.execute("UPDATE docs SET body = %s WHERE id = %s",
                            (body(random.Random(key), key, "1"), key))
            app.execute("UPDATE docs SET title = 'renamed' WHERE id BETWEEN 41 AND 45")
            app.execute("DELETE FROM docs WHERE id BETWEEN 51 AND 60")
            time.sleep(1.0)  # the stage skips parent 5 meanwhile (never waits on it)
            holder.execute("UPDATE docs SET body = %s WHERE id = 5",
                           (body(random.Random(5), 5, "1"),))
            holder.commit()
    fake_openai.set_faults(slow_model_latency=0.0)
    wait_for(lambda: settled(stack, target), timeout=120, interval=0.5,
             message="every chunk set current and embedded")
    with stack.connect() as conn:
        sets = chunk_sets(conn)
        assert set(sets) == set(range(1, 51))
        assert all(c.startswith("renamed: ") for k in range(41, 46) for c in sets[k])
        rows = conn.execute("SELECT chunk, embedding FROM docs_chunks").fetchall()
    for text, vector in rows:
        np.testing.assert_allclose(vector.to_numpy(), fake_vector(MODEL, text, 384),
                                   atol=1e-6)
    with psycopg.connect(roles.app_dsn, autocommit=True) as app:
        app.execute("DELETE FROM docs")  # (the app role may not TRUNCATE: no grant)
    wait_for(lambda: settled(stack, target), timeout=60, message="chunks removed")
    with stack.connect() as conn:
        assert chunk_sets(conn) == {}
    assert "chunk stage of docs" not in stack.log_text()  # no pass failed


def versioned(key: int, version: int) -> str:
    """Paragraphs that all carry the version: an edit replaces every chunk of the parent,
    so a search seeing chunks of two versions of one parent would show it."""
    rng = random.Random(key)
    return "\n\n".join(" ".join(f"parent {key} v{version} paragraph {p} w{rng.randint(0, 99)}"
                                for _ in range(12)) + "." for p in range(5))


@pytest.mark.timeout(300)
def test_searches_during_edits_never_see_two_versions_of_a_parent(stack: Stack) -> None:
    """Issue 25, test 3: 1,000 nearest-chunk searches during 100 edits (one edit every 10
    searches, chunk sets re-made and embedded meanwhile): no result holds chunks of two
    versions of one parent."""
    import re

    from pgreembed.store.pool import connect

    target = running_with_parents(stack, ((key, "t", versioned(key, 0)) for key in range(1, 21)))
    marker = re.compile(r"parent (\d+) v(\d+) ")
    mixed: list[tuple[int, set[str]]] = []
    parents_seen = 0
    rng = random.Random(3)
    with connect(stack.dsn, autocommit=True) as conn, \
            connect(stack.dsn, autocommit=True) as app:
        for n in range(1000):
            if n % 10 == 0:
                key = 1 + (n // 10) % 20
                app.execute("UPDATE docs SET body = %s WHERE id = %s",
                            (versioned(key, 1 + n // 200), key))
            query = fake_vector(MODEL, f"paragraph {rng.randint(0, 4)}", 384)
            hits = conn.execute("SELECT chunk FROM docs_chunks WHERE embedding IS NOT NULL"
                                " ORDER BY embedding <=> %s LIMIT 60", (query,)).fetchall()
            versions: dict[int, set[str]] = {}
            for (text,) in hits:
                found = marker.search(text)
                assert found is not None, text[:80]
                versions.setdefault(int(found[1]), set()).add(found[2])
            mixed += [(k, v) for k, v in versions.items() if len(v) > 1]
            parents_seen += len(versions)
    print(json.dumps({"searches": 1000, "edits": 100, "parents_seen": parents_seen,
                      "mixed": len(mixed)}))
    assert parents_seen > 1000
    assert mixed == []
    wait_for(lambda: settled(stack, target), timeout=120, message="last edits embedded")

