"""`pgreembed import-pgai` against a real pgai 0.12.1 (issue 26): its catalog installed by
`pgai.install`, vectorizers made by `ai.create_vectorizer`, chunk tables filled by pgai's
own worker through the fake OpenAI server (pgreembed.testing.pgai_side).

One database for the module (pgai's install and worker run once); each adopting test
takes a vectorizer of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgreembed.config import load_settings
from pgreembed.operations.chunk_search import search_parents
from pgreembed.testing import pgai_side
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.chunk_corpus import documents
from tests.helpers import API_KEY, ROOT, json_document

PARENTS = 240  # a few are empty (no chunks): at least 200 chunked parents to sample
VECTORIZERS = {
    "blog_recursive": {},
    "blog_character": {"chunking": "character",
                       "chunking_args": {"chunk_size": 600, "chunk_overlap": 200}},
    "blog_template": {"template": "$title by $author\n\n$chunk",
                      "chunking_args": {"chunk_size": 500, "chunk_overlap": 100}},
}


# One xdist worker for the file: the module fixture (pgai installed and filled) is built once.
pytestmark = pytest.mark.xdist_group("pgai_import")


@pytest.fixture(scope="module")
def pgai_db(server_dsn: str, fake_server: FakeOpenAIServer) -> Iterator[str]:
    """A database with pgai installed, three table-destination vectorizers on `blog` and a
    column-destination one on `notes`, all filled by pgai's worker."""
    name = f"t_pgai_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(server_dsn, dbname=name)
    fake_server.reset()
    assert pgai_side.install_pgai(dsn) == pgai_side.PGAI_VERSION
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE blog (id bigint PRIMARY KEY, title text, author text,"
                     " body text)")
        with conn.cursor().copy("COPY blog (id, title, author, body) FROM STDIN") as copy:
            for i, doc in enumerate(documents(PARENTS, seed=26), start=1):
                copy.write_row((i, f"Title {i}", f"Author {i % 7}", doc))
        conn.execute("CREATE TABLE notes (id integer PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO notes SELECT g, 'note number ' || g || ' about postgres'"
                     " FROM generate_series(1, 50) g")
        for vname, extra in VECTORIZERS.items():
            pgai_side.create_vectorizer(conn, pgai_side.VectorizerSpec(
                source="blog", name=vname, base_url=fake_server.base_url, **extra))
        pgai_side.create_vectorizer(conn, pgai_side.VectorizerSpec(
            source="notes", name="notes_col", destination="column", chunking="none",
            base_url=fake_server.base_url))
    pgai_side.run_pgai_worker_once(dsn, API_KEY)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for vname in [*VECTORIZERS, "notes_col"]:
            assert pgai_side.queue_count(conn, vname) == 0
    yield dsn
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def import_pgai(dsn: str, fake: FakeOpenAIServer, tmp: Path, *args: str
                ) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: no pgreembed config, DATABASE_URL and the provider's
    variables from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGREEMBED_")}
    env.update(DATABASE_URL=dsn, OPENAI_API_KEY=API_KEY, OPENAI_BASE_URL=fake.base_url,
               PYTHONPATH=str(ROOT), NO_PROXY="127.0.0.1,localhost")
    return subprocess.run([sys.executable, "-m", "pgreembed", "import-pgai", *args],
                          env=env, cwd=tmp, capture_output=True, text=True, timeout=300)


def plan_of(doc: dict[str, Any], name: str) -> dict[str, Any]:
    found = [v for v in doc["vectorizers"] if v["vectorizer"] == name]
    assert len(found) == 1, doc
    return found[0]


def chunk_table(conn: psycopg.Connection, name: str) -> str:
    target = pgai_side.vectorizer_row(conn, name).target
    assert target is not None
    return target


def test_dry_run_plans_every_vectorizer_and_re_splits_200_parents_identically(
        pgai_db: str, fake_openai: FakeOpenAIServer, tmp_path: Path) -> None:
    with psycopg.connect(pgai_db, autocommit=True) as conn:  # work pgai still owes
        conn.execute("INSERT INTO notes SELECT g, 'new note ' || g"
                     " FROM generate_series(901, 903) g")
        failed = sql.Identifier(*pgai_side.vectorizer_row(conn, "notes_col")
                                .queue_failed_table.split("."))
        conn.execute(sql.SQL("INSERT INTO {} (id, failure_step) VALUES (7, 'embedding'),"
                             " (8, 'loading')").format(failed))
    done = import_pgai(pgai_db, fake_openai, tmp_path, "--all", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    doc = json_document(done.stdout)
    assert doc["dry_run"] is True
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        for name in VECTORIZERS:
            plan = plan_of(doc, name)
            rows, chunks = conn.execute(sql.SQL(
                "SELECT (SELECT count(*) FROM blog), (SELECT count(*) FROM {})").format(
                sql.Identifier(*chunk_table(conn, name).split(".")))).fetchone() or (0, 0)
            assert (plan["maps_to"], plan["adoptable"], plan["rows"], plan["chunks"],
                    plan["queued"], plan["failed"]) == ("chunked", True, rows, chunks, 0, 0)
            assert chunks > 2 * rows
            check = plan["chunk_check"]
            assert (check["sampled"], check["identical"], check["match_share"]) == (
                200, 200, 1.0), (name, check)
            assert plan["target"]["chunking"]["template"] == \
                VECTORIZERS[name].get("template", "$chunk")
        notes = plan_of(doc, "notes_col")
        assert (notes["maps_to"], notes["rows"], notes["chunks"], notes["queued"],
                notes["failed"]) == ("ordinary", 53, 50, 3, 2)
        assert conn.execute("SELECT to_regnamespace('pgreembed')").fetchone() == (None,)
    assert fake_openai.stats()["inputs_embedded"] == 0

    # The check can fail: the catalog says 500 where the chunks were made with 600.
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        conn.execute("UPDATE ai.vectorizer SET config = jsonb_set(config,"
                     " '{chunking,chunk_size}', '500') WHERE name = 'blog_character'")
    try:
        # (without --adopt, --take-over or --undo a run is a dry run: the plan is the default)
        changed = import_pgai(pgai_db, fake_openai, tmp_path, "--vectorizer",
                              "blog_character", "--verify-chunks", "50", "--json")
        assert json_document(changed.stdout)["dry_run"] is True
        check = plan_of(json_document(changed.stdout), "blog_character")["chunk_check"]
        assert check["sampled"] == 50 and check["identical"] < 50, check
    finally:
        with psycopg.connect(pgai_db, autocommit=True) as conn:
            conn.execute("UPDATE ai.vectorizer SET config = jsonb_set(config,"
                         " '{chunking,chunk_size}', '600') WHERE name = 'blog_character'")


def test_adopt_with_no_embed_check_sends_nothing_and_rewrites_no_chunk(
        pgai_db: str, fake_openai: FakeOpenAIServer, tmp_path: Path) -> None:
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        table = chunk_table(conn, "blog_recursive")
        before = pgai_side.chunk_checksum(conn, table)
        versions = pgai_side.chunk_row_versions(conn, table)
    done = import_pgai(pgai_db, fake_openai, tmp_path, "--vectorizer", "blog_recursive",
                       "--adopt", "--no-embed-check", "--json")
    assert done.returncode == 0, done.stderr
    plan = plan_of(json_document(done.stdout), "blog_recursive")
    assert fake_openai.stats()["inputs_embedded"] == 0
    assert plan["vector_check"] is None and plan["adopted_chunks"] == before[0]
    assert plan["in_charge"] == "pgai"
    # The plan run again says so (it said "adoptable" after the adoption too).
    again = import_pgai(pgai_db, fake_openai, tmp_path, "--vectorizer", "blog_recursive",
                        "--verify-chunks", "0")
    assert again.returncode == 0, again.stderr
    assert "(adopted, pgai in charge)" in again.stdout, again.stdout
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        assert pgai_side.chunk_checksum(conn, table) == before
        assert pgai_side.chunk_row_versions(conn, table) == versions  # no row rewritten
        assert conn.execute("SELECT count(*) FROM pgreembed.chunk_dirty_blog_recursive"
                            ).fetchone() == (0,)
        assert conn.execute("SELECT attnotnull FROM pg_attribute WHERE attrelid ="
                            " %s::regclass AND attname = 'embedding'", (table,)
                            ).fetchone() == (False,)
    # The printed TOML is a working config: status counts every chunk embedded, none due.
    assert_status_all_embedded(pgai_db, plan["toml"], tmp_path, before[0])


def config_env(dsn: str, toml: str, tmp: Path) -> dict[str, str]:
    """The environment of pgreembed's commands run with an imported target's TOML."""
    config = tmp / "pgreembed.toml"
    config.write_text(toml)
    return {**os.environ, "DATABASE_URL": dsn, "PGREEMBED_CONFIG": str(config),
            "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(ROOT),
            "REDIS_URL": "redis://127.0.0.1:1/0"}


def assert_status_all_embedded(dsn: str, toml: str, tmp: Path, chunks: int) -> None:
    status = subprocess.run([sys.executable, "-m", "pgreembed", "status", "--exact", "--json"],
                            env=config_env(dsn, toml, tmp), cwd=tmp, capture_output=True,
                            text=True, timeout=120)
    assert status.returncode == 0, status.stderr
    [column] = json_document(status.stdout)["columns"]
    assert (column["embedded"], column["pending"], column["stale"], column["outdated"]) == (
        chunks, 0, 0, 0), column


def test_adopt_checks_vectors_and_refuses_a_model_that_differs(
        pgai_db: str, fake_openai: FakeOpenAIServer, tmp_path: Path) -> None:
    """K = 20 texts re-embedded (a template of two columns); a catalog naming another
    model than the vectors' is refused with nothing adopted."""
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        conn.execute("UPDATE ai.vectorizer SET config = jsonb_set(config,"
                     " '{embedding,model}', '\"fake-other-model\"') WHERE name = 'blog_character'")
    try:
        refused = import_pgai(pgai_db, fake_openai, tmp_path, "--vectorizer", "blog_character",
                              "--adopt", "--verify-vectors", "5", "--json")
    finally:
        with psycopg.connect(pgai_db, autocommit=True) as conn:
            conn.execute("UPDATE ai.vectorizer SET config = jsonb_set(config,"
                         " '{embedding,model}', '\"text-embedding-3-small\"')"
                         " WHERE name = 'blog_character'")
    assert refused.returncode == 4, refused.stderr
    assert "model differs" in json_document(refused.stdout)["error"]["message"]
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        assert conn.execute("SELECT to_regclass('pgreembed.chunk_dirty_blog_character')"
                            ).fetchone() == (None,)

    fake_openai.reset()
    done = import_pgai(pgai_db, fake_openai, tmp_path, "--vectorizer", "blog_template",
                       "--adopt", "--json")
    assert done.returncode == 0, done.stderr
    plan = plan_of(json_document(done.stdout), "blog_template")
    assert plan["vector_check"]["sampled"] == 20 and plan["vector_check"]["below"] == 0
    assert plan["vector_check"]["min_cosine"] >= 0.999
    assert fake_openai.stats()["inputs_embedded"] == 20
    assert plan["adopted_chunks"] == plan["chunks"]


def test_a_column_destination_becomes_an_ordinary_target_with_nothing_embedded(
        pgai_db: str, fake_openai: FakeOpenAIServer, tmp_path: Path) -> None:
    # All or nothing: with a vectorizer that cannot be adopted among those named (a
    # composite key on a column destination: an ordinary target), none is, and the reason
    # is named.
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE pairs (a int, b int, body text, PRIMARY KEY (a, b))")
        pgai_side.create_vectorizer(conn, pgai_side.VectorizerSpec(
            source="pairs", name="pairs_v", destination="column", chunking="none",
            embedder="voyageai", model="voyage-3"))
    refused = import_pgai(pgai_db, fake_openai, tmp_path, "--vectorizer", "pairs_v",
                          "--vectorizer", "notes_col", "--adopt", "--no-embed-check", "--json")
    assert refused.returncode == 4, refused.stderr
    assert "composite primary key" in json_document(refused.stdout)["error"]["message"]
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        # Postgres resolves every table a statement names before it runs, so the registry
        # is looked up only when it exists (a refused first import may not have made it).
        registry = conn.execute("SELECT to_regclass('pgreembed.slots')").fetchone()
        assert registry is not None
        if registry[0] is not None:
            assert conn.execute("SELECT count(*) FROM pgreembed.slots"
                                " WHERE target = 'notes_col'").fetchone() == (0,)

    done = import_pgai(pgai_db, fake_openai, tmp_path, "--vectorizer", "notes_col",
                       "--adopt", "--no-embed-check", "--json")
    assert done.returncode == 0, done.stderr
    plan = plan_of(json_document(done.stdout), "notes_col")
    assert (plan["maps_to"], plan["adopted_chunks"]) == ("ordinary", 50)
    assert plan["target"]["vector_column"] == "embedding" and "chunking" not in plan["target"]
    assert fake_openai.stats()["inputs_embedded"] == 0
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        slot = conn.execute("SELECT table_name, vector_column FROM pgreembed.slots"
                            " WHERE target = 'notes_col'").fetchall()
        assert slot == [("notes", "embedding")]


def test_a_two_column_key_vectorizer_is_adopted_with_nothing_sent(
        pgai_db: str, fake_openai: FakeOpenAIServer, tmp_path: Path) -> None:
    """pgai keys its chunk table by every column of the source's key: adopted as a chunked
    target keyed by both (dirty marks pgr_pk_<column>), 0 texts sent, no chunk rewritten,
    the chunk check finds parents by both columns (ids repeat across tenants), and search
    groups by both (the take-over: tests/test_pgai_takeover.py)."""
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE tenant_docs (tenant_id int, doc_id text, title text,"
                     " body text, PRIMARY KEY (tenant_id, doc_id))")
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO tenant_docs VALUES (%s, %s, %s, %s)",
                            [(t, f"doc-{i}", f"Tenant {t} doc {i}", doc) for i, doc in
                             enumerate(documents(12, seed=27)) for t in (1, 2)])
        vid = pgai_side.create_vectorizer(conn, pgai_side.VectorizerSpec(
            source="tenant_docs", name="tenant_v", base_url=fake_openai.base_url,
            template="$title\n\n$chunk"))
    pgai_side.run_pgai_worker_once(pgai_db, API_KEY, vectorizer_ids=[vid])
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        assert pgai_side.queue_count(conn, "tenant_v") == 0
        table = chunk_table(conn, "tenant_v")
        before = pgai_side.chunk_checksum(conn, table)
        versions = pgai_side.chunk_row_versions(conn, table)
        parents = conn.execute(sql.SQL("SELECT count(DISTINCT (tenant_id, doc_id)) FROM {}"
                                       ).format(sql.Identifier(*table.split(".")))).fetchone()
    fake_openai.reset()
    done = import_pgai(pgai_db, fake_openai, tmp_path, "--vectorizer", "tenant_v", "--adopt",
                       "--no-embed-check", "--verify-chunks", "20", "--json")
    assert done.returncode == 0, done.stderr
    plan = plan_of(json_document(done.stdout), "tenant_v")
    assert (plan["maps_to"], plan["adopted_chunks"]) == ("chunked", before[0])
    assert "primary_key" not in plan["target"]
    check = plan["chunk_check"]
    assert (check["sampled"], check["identical"]) == (20, 20), check
    assert fake_openai.stats()["inputs_embedded"] == 0
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        assert pgai_side.chunk_checksum(conn, table) == before
        assert pgai_side.chunk_row_versions(conn, table) == versions  # no row rewritten
        assert conn.execute(
            "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute WHERE attrelid"
            " = 'pgreembed.chunk_dirty_tenant_v'::regclass AND attnum > 0").fetchone() == (
            ["pgr_pk_tenant_id", "pgr_pk_doc_id", "pgr_marked_at"],)
        assert conn.execute("SELECT count(*) FROM pgreembed.chunk_dirty_tenant_v"
                            ).fetchone() == (0,)
    assert_status_all_embedded(pgai_db, plan["toml"], tmp_path, before[0])
    settings = load_settings(tmp_path / "pgreembed.toml",
                             {**config_env(pgai_db, plan["toml"], tmp_path),
                              "OPENAI_BASE_URL": fake_openai.base_url})
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        hits = search_parents(conn, settings, "tenant_v", "postgres vacuum", limit=100)
    assert len(hits) == len({h.key for h in hits}) == parents[0]  # both tenants of each id
    assert {type(h.key) for h in hits} == {tuple} and {h.key[0] for h in hits} == {1, 2}



def test_a_catalog_older_than_0_10_is_refused_with_nothing_changed(
        database_url: str, fake_openai: FakeOpenAIServer, tmp_path: Path) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE blog (id bigint PRIMARY KEY, body text)")
        pgai_side.make_pre_010_catalog(conn, "public.blog", "blog_embedding")
        before = conn.execute("SELECT (SELECT array_agg(relname::text ORDER BY relname)"
                              " FROM pg_class WHERE relnamespace <> 'pg_catalog'::regnamespace"
                              " AND relnamespace <> 'information_schema'::regnamespace"
                              " AND relnamespace::regnamespace::text NOT LIKE 'pg_toast%'),"
                              " (SELECT jsonb_agg(v) FROM ai.vectorizer v)").fetchone()
    # Refused before anything is read or changed (a dry run takes the same first step).
    done = import_pgai(database_url, fake_openai, tmp_path, "--all", "--json")
    assert done.returncode == 4, done.stderr
    message = json_document(done.stdout)["error"]["message"]
    assert "older than 0.10" in message and "pgai install" in message, message
    assert "ALTER EXTENSION ai UPDATE" in message
    with psycopg.connect(database_url, autocommit=True) as conn:
        after = conn.execute("SELECT (SELECT array_agg(relname::text ORDER BY relname)"
                             " FROM pg_class WHERE relnamespace <> 'pg_catalog'::regnamespace"
                             " AND relnamespace <> 'information_schema'::regnamespace"
                             " AND relnamespace::regnamespace::text NOT LIKE 'pg_toast%'),"
                             " (SELECT jsonb_agg(v) FROM ai.vectorizer v)").fetchone()
    assert after == before
    assert fake_openai.stats()["inputs_embedded"] == 0


def test_an_embedder_pgreembed_lacks_is_adopted_frozen_and_never_taken_over(
        pgai_db: str, fake_openai: FakeOpenAIServer, redis_url: str, tmp_path: Path) -> None:
    """pgai's embedding_litellm: adopted (its vectors served and counted, 0 texts sent, not
    even for the vector check), its column marked with the missing provider's name, so the
    scheduler dispatches nothing and no row is failed; --take-over refuses it (pgai keeps
    serving it), before and after the adoption."""
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        conn.execute("CREATE TABLE memos (id bigint PRIMARY KEY, body text)")
        conn.execute("INSERT INTO memos SELECT g, repeat('memo ' || g || ' about vacuum. ', 30)"
                     " FROM generate_series(1, 20) g")
        vid = pgai_side.create_vectorizer(conn, pgai_side.VectorizerSpec(
            source="memos", name="memos_litellm", base_url=fake_openai.base_url))
    pgai_side.run_pgai_worker_once(pgai_db, API_KEY, vectorizer_ids=[vid])
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        # The catalog as pgai writes it for embedding_litellm (its worker filled the
        # chunks through the fake server; litellm is not installed here).
        conn.execute("UPDATE ai.vectorizer SET config = jsonb_set(config, '{embedding}',"
                     " ai.embedding_litellm('cohere/embed-english-v3.0', 64)) WHERE id = %s",
                     (vid,))
        table = chunk_table(conn, "memos_litellm")
        before = pgai_side.chunk_checksum(conn, table)
    fake_openai.reset()

    plan = plan_of(json_document(import_pgai(pgai_db, fake_openai, tmp_path, "--vectorizer",
                                             "memos_litellm", "--json").stdout),
                   "memos_litellm")
    assert (plan["adoptable"], plan["foreign"]) == (True, True), plan
    [note] = [n for n in plan["not_mapped"] if n["kind"] == "foreign"]
    assert note["what"] == "embedding litellm" and "not in pgreembed" in note["reason"]
    assert plan["target"]["provider"] == "pgai-litellm"

    def refused_take_over() -> None:
        done = import_pgai(pgai_db, fake_openai, tmp_path, "--vectorizer", "memos_litellm",
                           "--take-over", "--no-embed-check", "--json")
        assert done.returncode == 4, done.stderr
        message = json_document(done.stdout)["error"]["message"]
        assert "'litellm'" in message and "pgai's worker keeps serving" in message, message
        with psycopg.connect(pgai_db, autocommit=True) as conn:
            assert conn.execute("SELECT disabled FROM ai.vectorizer WHERE name ="
                                " 'memos_litellm'").fetchone() == (False,)
            assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgrelid ="
                                " 'memos'::regclass AND tgenabled <> 'D' AND NOT tgisinternal"
                                " AND tgname LIKE 'pgr%'").fetchone() == (0,)

    refused_take_over()
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        if conn.execute("SELECT to_regclass('pgreembed.slots')").fetchone() != (None,):
            assert conn.execute("SELECT count(*) FROM pgreembed.slots"
                                " WHERE target = 'memos_litellm'").fetchone() == (0,)

    # Adopted without --no-embed-check: the vector check is skipped, nothing is sent.
    done = import_pgai(pgai_db, fake_openai, tmp_path, "--vectorizer", "memos_litellm",
                       "--adopt", "--json")
    assert done.returncode == 0, done.stderr
    plan = plan_of(json_document(done.stdout), "memos_litellm")
    assert plan["vector_check"]["sampled"] == 0 and "pgai-litellm" in \
        plan["vector_check"]["skipped"]
    assert plan["adopted_chunks"] == before[0]
    with psycopg.connect(pgai_db, autocommit=True) as conn:
        assert pgai_side.chunk_checksum(conn, table) == before
        # a chunk pgai has not embedded yet: pending for pgreembed, and it stays so
        conn.execute(sql.SQL("UPDATE {} SET embedding = NULL WHERE id = 1 AND chunk_seq = 0"
                             ).format(sql.Identifier(*table.split("."))))
    config = tmp_path / "pgreembed.toml"
    config.write_text(plan["toml"])
    env = {**os.environ, "DATABASE_URL": pgai_db, "PGREEMBED_CONFIG": str(config),
           "OPENAI_API_KEY": API_KEY, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url}

    def cli(*args: str) -> dict[str, Any]:
        ran = subprocess.run([sys.executable, "-m", "pgreembed", *args, "--json"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr
        return json_document(ran.stdout)

    ran = subprocess.run([sys.executable, "-m", "pgreembed", "tick"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr  # frozen as meant: not an exit 4
    assert "is frozen: provider 'litellm'" in ran.stderr, ran.stderr
    [column] = cli("status", "--exact")["columns"]
    assert (column["embedded"], column["pending"], column["failed"]) == (
        before[0] - 1, 1, 0), column
    assert "'litellm'" in column["misconfigured"] and "not in pgreembed" in \
        column["misconfigured"], column
    assert column["frozen"] is True, column
    text = subprocess.run([sys.executable, "-m", "pgreembed", "status"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert "FROZEN memos_litellm." in text.stdout and "MISCONFIGURED" not in text.stdout, \
        text.stdout
    failures = cli("failures", "--target", "memos_litellm")
    assert (failures["failures"], failures["parent_failures"]) == ([], [])
    assert fake_openai.stats()["inputs_embedded"] == 0
    refused_take_over()
