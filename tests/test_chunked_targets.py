"""Chunked targets on a real Postgres: init, the parent's triggers, the chunk stage."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgreembed.chunking.splitter import chunker
from pgreembed.chunking.stage import rechunk, run_chunk_stage
from pgreembed.config import load_settings
from pgreembed.errors import SetupError
from pgreembed.store.pool import connect
from pgreembed.store.setup import init_target
from tests.chunk_corpus import documents, long_document
from tests.helpers import OrdinaryRoles, Stack, counts, json_document, write_config

CHUNKED = """
[[target]]
name = "docs"
table = "public.docs"
text_column = "body"
vector_column = "embedding"
provider = "openai"
model = "fake-384"
dimensions = 384
batch_size = {batch_size}

[target.chunking]
size = 800
overlap = 400
template = "$title: $chunk"
{destination}
[worker]
poll_interval = 0.5
max_inflight_rows = 512
"""


def chunked_stack(stack: Stack, batch_size: int = 64, destination: str = "") -> Any:
    write_config(stack.config_path, CHUNKED.format(batch_size=batch_size,
                                                   destination=destination))
    return load_settings(stack.config_path, stack.env)


def init(stack: Stack) -> Any:
    settings = load_settings(stack.config_path, stack.env)
    target = settings.target("docs")
    init_target(stack.dsn, target)
    return target


def _key(columns: tuple[str, ...], row: tuple[Any, ...]) -> Any:
    """A parent's key as search_parents gives it: a scalar, or a tuple when composite."""
    return row[0] if len(columns) == 1 else tuple(row[:len(columns)])


def chunk_sets(conn: psycopg.Connection, key: tuple[str, ...] = ("id",),
               table: str = "docs_chunks") -> dict[Any, list[str]]:
    """Each parent's chunk texts in chunk_seq order (`key`: the parent's key columns)."""
    sets: dict[Any, list[str]] = {}
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in key)
    for row in conn.execute(sql.SQL("SELECT {k}, chunk_seq, chunk FROM {t}"
                                    " ORDER BY {k}, chunk_seq").format(
                                        k=columns, t=sql.Identifier(table))):
        parent, seq, text = _key(key, row), row[-2], row[-1]
        assert seq == len(sets.setdefault(parent, []))  # 0-based, consecutive
        sets[parent].append(text)
    return sets


def expected(conn: psycopg.Connection, target: Any, key: tuple[str, ...] = ("id",)
             ) -> dict[Any, list[str]]:
    split = chunker(target.parent.chunking, target.provider, target.model)
    wanted = {_key(key, row): split(row[-1] or "", {"title": row[-2]})
              for row in conn.execute(sql.SQL("SELECT {}, title, body FROM docs").format(
                  sql.SQL(", ").join(sql.Identifier(c) for c in key)))}
    return {k: v for k, v in wanted.items() if v}


def drain(dsn: str, target: Any) -> None:
    with connect(dsn) as conn:
        while rechunk(conn, target).parents:
            pass


def dirty(conn: psycopg.Connection) -> set[int]:
    return {r[0] for r in conn.execute("SELECT pgr_pk FROM pgreembed.chunk_dirty_docs")}


def chunk_columns(conn: psycopg.Connection) -> list[tuple[str, str, bool]]:
    """(name, type, NOT NULL) of docs_chunks' columns in order."""
    return conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull"
        " FROM pg_attribute a WHERE a.attrelid = 'docs_chunks'::regclass AND a.attnum > 0"
        " AND NOT a.attisdropped ORDER BY a.attnum").fetchall()


@contextmanager
def old_snapshot(dsn: str) -> Iterator[psycopg.Connection]:
    """An app transaction in REPEATABLE READ whose snapshot is taken on entry (what it
    deletes afterwards may have changed since); committed on exit."""
    with psycopg.connect(dsn) as app:
        app.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        app.execute("SELECT count(*) FROM docs")  # the snapshot is taken here
        yield app
        app.commit()


def test_init_creates_pgai_layout_and_marks_existing_rows(stack: Stack) -> None:
    chunked_stack(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) SELECT 't' || i, %s FROM"
                     " generate_series(1, 3) i", (long_document(),))
    target = init(stack)
    with stack.connect() as conn:
        assert chunk_columns(conn) == [("embedding_uuid", "uuid", True), ("id", "bigint", True),
                           ("chunk_seq", "integer", True), ("chunk", "text", True),
                           ("embedding", "vector(384)", False)]
        assert conn.execute("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON"
                            " a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) WHERE"
                            " i.indrelid = 'docs_chunks'::regclass AND i.indisprimary"
                            ).fetchall() == [("embedding_uuid",)]
        assert dirty(conn) == {1, 2, 3}
    init(stack)  # again: nothing changes, no second mark
    drain(stack.dsn, target)
    with stack.connect() as conn:
        sets = chunk_sets(conn)
        assert sets == expected(conn, target)
        assert len(sets[1]) >= 40 and sets[1][0].startswith("t1: ")
        assert conn.execute("SELECT count(*) FROM docs_chunks WHERE embedding IS NOT NULL"
                            ).fetchone() == (0,)
        assert dirty(conn) == set()


def test_trigger_marks_text_and_template_edits_only(stack: Stack) -> None:
    chunked_stack(stack)
    target = init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('a', 'one'), ('b', 'two')")
        assert dirty(conn) == {1, 2}
    drain(stack.dsn, target)
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET views = views + 1")
        conn.execute("UPDATE docs SET body = body")  # the same text: no change
        assert dirty(conn) == set()
        conn.execute("UPDATE docs SET body = 'one more' WHERE id = 1")
        conn.execute("UPDATE docs SET title = 'B' WHERE id = 2")
        assert dirty(conn) == {1, 2}
    drain(stack.dsn, target)
    with stack.connect() as conn:
        assert chunk_sets(conn) == {1: ["a: one more"], 2: ["B: two"]}
        uuid = conn.execute("SELECT embedding_uuid FROM docs_chunks WHERE id = 1").fetchone()
        conn.execute("UPDATE docs SET id = 10 WHERE id = 1")  # the key moves its chunks
        assert conn.execute("SELECT embedding_uuid FROM docs_chunks WHERE id = 10"
                            ).fetchone() == uuid
        assert dirty(conn) == set()
        conn.execute("DELETE FROM docs WHERE id = 10")
        assert chunk_sets(conn) == {2: ["B: two"]}
        conn.execute("UPDATE docs SET body = 'changed' WHERE id = 2")
        conn.execute("TRUNCATE docs")
        assert chunk_sets(conn) == {} and dirty(conn) == set()


def test_edit_keeps_unchanged_chunks_and_their_vectors(stack: Stack) -> None:
    chunked_stack(stack)
    target = init(stack)
    text = long_document()
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('doc', %s)", (text,))
    drain(stack.dsn, target)
    with stack.connect() as conn:
        conn.execute("UPDATE docs_chunks SET embedding = array_fill(0.5, ARRAY[384])::vector")
        before = dict(conn.execute("SELECT chunk, embedding_uuid FROM docs_chunks"))
        paragraphs = text.split("\n\n")
        middle = len(paragraphs) // 2
        paragraphs[middle] += " One sentence added by the edit."
        conn.execute("UPDATE docs SET body = %s", ("\n\n".join(paragraphs),))
    drain(stack.dsn, target)
    with stack.connect() as conn:
        assert chunk_sets(conn) == expected(conn, target)
        after = conn.execute("SELECT chunk, embedding_uuid, embedding IS NOT NULL"
                             " FROM docs_chunks").fetchall()
        new = [c for c, u, has in after if before.get(c) != u]
        assert 1 <= len(new) <= 2
        assert all(has for c, u, has in after if c not in new)  # kept rows kept their vector
        assert not any(has for c, u, has in after if c in new)


def test_stale_split_is_never_written(stack: Stack) -> None:
    """A parent edited between the split and the apply stays dirty; its chunk set is
    written from its current text on the next batch."""
    chunked_stack(stack)
    target = init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('a', 'first')")
    from pgreembed.store import chunk_sets as sets_module

    real = sets_module.apply_chunk_sets

    def edit_then_apply(conn: psycopg.Connection, *args: Any) -> Any:
        with connect(stack.dsn, autocommit=True) as app:
            app.execute("UPDATE docs SET body = 'second' WHERE id = 1")
        return real(conn, *args)

    import pgreembed.chunking.stage as stage_module
    stage_module.apply_chunk_sets = edit_then_apply  # type: ignore[assignment]
    try:
        with connect(stack.dsn) as conn:
            applied = rechunk(conn, target)
    finally:
        stage_module.apply_chunk_sets = real
    assert (applied.parents, applied.stale) == (0, 1)
    with stack.connect() as conn:
        assert chunk_sets(conn) == {} and dirty(conn) == {1}
    drain(stack.dsn, target)
    with stack.connect() as conn:
        assert chunk_sets(conn) == {1: ["a: second"]}


def test_app_row_lock_is_skipped_not_waited_for(stack: Stack) -> None:
    chunked_stack(stack)
    target = init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('a', 'x'), ('b', 'y')")
    with connect(stack.dsn) as app:
        app.execute("SELECT 1 FROM docs WHERE id = 1 FOR NO KEY UPDATE")
        started = time.monotonic()
        with connect(stack.dsn) as conn:
            report = run_chunk_stage(conn, load_settings(stack.config_path, stack.env))
        assert time.monotonic() - started < 2
        assert report.parents == 1 and report.stale >= 1  # each batch finds it held
        app.rollback()
    drain(stack.dsn, target)
    with stack.connect() as conn:
        assert chunk_sets(conn) == {1: ["a: x"], 2: ["b: y"]}


@pytest.mark.timeout(120)
def test_deleting_10000_parents_of_10_chunks_leaves_no_orphan(stack: Stack) -> None:
    chunked_stack(stack)
    init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) SELECT 't', 'b' FROM"
                     " generate_series(1, 10000)")
        conn.execute("DELETE FROM pgreembed.chunk_dirty_docs")
        # 10 chunks each, embedded, with their state rows (as the workers leave them).
        conn.execute("INSERT INTO docs_chunks (id, chunk_seq, chunk, embedding) SELECT d.id,"
                     " s, 'chunk ' || d.id || ' ' || s, array_fill(0.1, ARRAY[384])::vector"
                     " FROM docs d, generate_series(0, 9) s")
        slot = conn.execute("SELECT id FROM pgreembed.slots WHERE target = 'docs'").fetchone()
        assert slot is not None
        conn.execute(f"INSERT INTO pgreembed.slot_{slot[0]} (pgr_pk, pgr_model_id, pgr_hash)"
                     " SELECT embedding_uuid, 1, md5(chunk)::uuid FROM docs_chunks")
        conn.execute("ANALYZE docs_chunks")
        started = time.monotonic()
        conn.execute("DELETE FROM docs")
        took = time.monotonic() - started
        assert conn.execute("SELECT count(*) FROM docs_chunks").fetchone() == (0,)
        assert conn.execute(f"SELECT count(*) FROM pgreembed.slot_{slot[0]}").fetchone() == (0,)
    print(json.dumps({"delete_seconds": round(took, 3)}))
    assert took < 5, took


def test_many_documents_chunk_as_pgai_would(stack: Stack) -> None:
    chunked_stack(stack)
    target = init(stack)
    docs = documents(300, seed=3)
    with stack.connect() as conn, conn.cursor().copy(
            "COPY docs (title, body) FROM STDIN") as copy:
        for i, body in enumerate(docs):
            copy.write_row((f"title {i}", body))
    drain(stack.dsn, target)
    with stack.connect() as conn:
        assert chunk_sets(conn) == expected(conn, target)


def test_repeatable_read_delete_racing_the_stage_leaves_no_orphan(stack: Stack) -> None:
    """An app transaction in REPEATABLE READ whose snapshot predates a chunk set's commit
    deletes the parent: its trigger cannot see the new chunks; the stage removes them."""
    chunked_stack(stack)
    target = init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('a', 'x'), ('b', 'y')")
    with psycopg.connect(stack.dsn) as app:
        app.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        app.execute("SELECT count(*) FROM docs")  # the snapshot is taken here
        drain(stack.dsn, target)
        app.execute("DELETE FROM docs WHERE id = 1")
        app.commit()
    with stack.connect() as conn:
        run_chunk_stage(conn, load_settings(stack.config_path, stack.env))
    with stack.connect() as conn:
        assert chunk_sets(conn) == {2: ["b: y"]}


def test_repeatable_read_truncate_and_serialization_conflicts(stack: Stack) -> None:
    """REPEATABLE READ app transactions never fail on rows the stage changed since their
    snapshot (the delete trigger skips them and leaves marks), and a TRUNCATE whose
    snapshot predates a chunk set leaves no chunk behind either."""
    chunked_stack(stack)
    target = init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('a', 'x'), ('b', 'y')")
    drain(stack.dsn, target)
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'x2' WHERE id = 1")
    with psycopg.connect(stack.dsn) as app:
        app.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        app.execute("SELECT count(*) FROM docs")
        drain(stack.dsn, target)  # deletes and inserts rows of parent 1 after the snapshot
        app.execute("DELETE FROM docs WHERE id = 1")
        app.commit()
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('c', 'z')")
    with psycopg.connect(stack.dsn) as app:
        app.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        app.execute("SELECT count(*) FROM docs")
        drain(stack.dsn, target)
        app.execute("TRUNCATE docs")
        app.commit()
    with stack.connect() as conn:
        report = run_chunk_stage(conn, load_settings(stack.config_path, stack.env))
        assert report.removed >= 1  # what the two old snapshots could not see
        assert chunk_sets(conn) == {} and dirty(conn) == set()
        assert conn.execute("SELECT count(*) FROM pgreembed.chunk_gone_docs").fetchone() == (0,)


def test_changed_chunking_is_not_applied_in_place(stack: Stack) -> None:
    """A changed [target.chunking] is a re-chunk migration (tests/test_rechunk_migration):
    `init` marks nothing, and the stage keeps splitting edits with the settings the set was
    made with, so the table never mixes two settings. (Before: every parent was marked and
    re-chunked in place with the new settings.)"""
    chunked_stack(stack)
    target = init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('a', %s), ('b', 'short')",
                     (long_document(),))
    drain(stack.dsn, target)
    init(stack)  # the same settings: nothing to do
    with stack.connect() as conn:
        assert dirty(conn) == set()
        before = chunk_sets(conn)
    write_config(stack.config_path, CHUNKED.format(batch_size=64, destination="").replace(
        "size = 800\noverlap = 400", "size = 1200\noverlap = 100"))
    changed = init(stack)
    with stack.connect() as conn:
        assert dirty(conn) == set()
        assert chunk_sets(conn) == before
        conn.execute("UPDATE docs SET body = body || ' Appended.' WHERE id = 1")
        with connect(stack.dsn) as stage:
            run_chunk_stage(stage, load_settings(stack.config_path, stack.env))
        assert chunk_sets(conn) == expected(conn, target)  # the settings it was made with
        assert chunk_sets(conn) != expected(conn, changed)


def test_status_counts_parents_to_chunk(stack: Stack) -> None:
    chunked_stack(stack)
    target = init(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) SELECT 't', 'b' || i FROM"
                     " generate_series(1, 7) i")
    out = stack.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    doc = json_document(out.stdout)
    [found] = doc["chunking"]
    assert {k: found[k] for k in ("target", "parent_table", "chunk_table",
                                  "parents_to_chunk")} == {
        "target": "docs", "parent_table": "public.docs", "chunk_table": "public.docs_chunks",
        "parents_to_chunk": 7}
    drain(stack.dsn, target)
    text = stack.cli("status").stdout
    line = next(t for t in text.splitlines() if t.startswith("chunks of docs:"))
    assert counts(r"(\d+) parents in public.docs, (\d+) to chunk; (\d+) chunks", line) == [
        (7, 0, 7)], line


def test_first_marks_do_not_depend_on_an_empty_dirty_table(stack: Stack) -> None:
    """A row the app inserts between the triggers' creation and the first marks must not
    stop the existing rows from being marked (an init interrupted there, run again)."""
    chunked_stack(stack)
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('a', 'x'), ('b', 'y')")
    init(stack)
    with stack.connect() as conn:  # as if init stopped after the triggers
        conn.execute("COMMENT ON TABLE pgreembed.chunk_dirty_docs IS NULL")
        conn.execute("DELETE FROM pgreembed.chunk_dirty_docs")
        conn.execute("INSERT INTO docs (title, body) VALUES ('c', 'z')")
        assert dirty(conn) == {3}
    init(stack)
    with stack.connect() as conn:
        assert dirty(conn) == {1, 2, 3}


def test_view_refused_before_anything_is_made_when_the_parent_has_a_chunk_column(
        stack: Stack) -> None:
    """Was a bare `DuplicateColumn: column "embedding" specified more than once` from
    CREATE VIEW, after the chunk table had been created."""
    chunked_stack(stack, destination='[target.destination]\nview = "docs_view"')
    with stack.connect() as conn:
        conn.execute("ALTER TABLE docs ADD COLUMN embedding vector(384)")
    with pytest.raises(SetupError, match="view docs_view would have column 'embedding' twice"):
        init(stack)
    with stack.connect() as conn:
        assert conn.execute("SELECT to_regclass('docs_chunks')").fetchone() == (None,)


def test_the_apps_roles_may_read_the_chunks_pgreembeds_role_made(
        ordinary_roles: tuple[Stack, OrdinaryRoles]) -> None:
    """Made by pgreembed's role, the chunk table and the view were readable by nobody
    else: the app (the parent's owner, and a role granted SELECT on the parent) got
    "permission denied" searching its own chunks (a new-user probe). Those who may read
    the parent may read its chunks, as pgai grants its chunk tables."""
    stack, roles = ordinary_roles
    chunked_stack(stack, destination='[target.destination]\nview = "docs_view"\n')
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) VALUES ('t', %s)", (long_document(),))
    result = stack.cli("init")
    assert result.returncode == 0, result.stderr
    with stack.connect() as conn:
        owners = conn.execute("SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class"
                              " WHERE relname IN ('docs_chunks', 'docs_view')").fetchall()
    assert owners == [(roles.pgreembed,)]  # made by pgreembed's role
    with psycopg.connect(roles.app_dsn, autocommit=True) as app:
        assert app.execute("SELECT count(*) FROM docs_chunks").fetchone() == (0,)
        assert app.execute("SELECT count(*) FROM docs_view").fetchone() == (0,)
    with stack.connect() as conn:
        conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles.owner)))
        assert conn.execute("SELECT count(*) FROM docs_chunks").fetchone() == (0,)
    assert stack.cli("init").returncode == 0  # again: nothing left to grant
