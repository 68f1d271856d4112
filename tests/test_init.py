"""`pgreembed init`: idempotent, quoted identifiers, clear errors."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from pgreembed.errors import SetupError
from pgreembed.store.setup import init_target
from tests.helpers import (
    Stack,
    create_ordinary_roles,
    docs_config,
    drop_ordinary_roles,
    make_target,
    seed,
    write_config,
)

HOSTILE = 'we"ird; DROP TABLE victim; --'


def test_init_is_idempotent_and_creates_bookkeeping(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO docs VALUES (1, 'a'), (2, 'b')")
    target = make_target(database_url)
    first = init_target(database_url, target)
    second = init_target(database_url, target)
    assert first.id == second.id
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE"
                            " attrelid = 'docs'::regclass AND attname = 'embedding'"
                            ).fetchone() == ("vector(384)",)
        index = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s",
                             (first.pending_index_name,)).fetchone()
        assert index is not None and "WHERE (embedding IS NULL)" in index[0]
        triggers = {r[0] for r in conn.execute(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = 'docs'::regclass AND NOT tgisinternal")}
        assert triggers == {"pgreembed_clear_docs", "pgreembed_notify_docs",
                            "pgreembed_forget_docs", "pgreembed_forget_all_docs"}
        assert conn.execute("SELECT count(*) FROM pgreembed.slots").fetchone() == (1,)


def test_finding_pending_rows_uses_the_partial_index(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text,"
                     " embedding vector(384))")
        conn.execute("INSERT INTO docs SELECT g, 'text ' || g, CASE WHEN g % 5000 = 0 THEN NULL"
                     " ELSE array_fill(0.1, ARRAY[384])::vector END"
                     " FROM generate_series(1, 20000) g")
    target = make_target(database_url)
    slot = init_target(database_url, target)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ANALYZE docs")
        from pgreembed.store.pending import missing_page

        assert missing_page(conn, slot, None, 10) == [5000, 10000, 15000, 20000]
        plan = "\n".join(r[0] for r in conn.execute(
            "EXPLAIN SELECT id FROM docs WHERE embedding IS NULL ORDER BY id LIMIT 10"))
        assert slot.pending_index_name in plan, plan
        assert "Seq Scan on docs" not in plan, plan


def test_hostile_identifiers_are_quoted(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE victim (id int)")
        conn.execute(sql.SQL('CREATE TABLE {} (id int PRIMARY KEY, "t""x" text)').format(
            sql.Identifier(HOSTILE)))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, 'hello')").format(
            sql.Identifier(HOSTILE)))
    target = make_target(database_url, table=f"public.{HOSTILE}", text_column='t"x',
                         vector_column='v"ec')
    slot = init_target(database_url, target)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('victim') IS NOT NULL").fetchone() == (True,)
        from pgreembed.store.pending import missing_page

        assert missing_page(conn, slot, None, 10) == [1]


def test_clear_errors(database_url: str) -> None:
    with pytest.raises(SetupError, match="table public.missing does not exist"):
        init_target(database_url, make_target(database_url, table="missing"))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, embedding vector(3))")
    with pytest.raises(SetupError, match=r"column 'embedding' is vector\(3\), expected"
                                         r" vector\(384\)"):
        init_target(database_url, make_target(database_url))
    with pytest.raises(SetupError, match="text column 'nope' does not exist"):
        init_target(database_url, make_target(database_url, text_column="nope"))


def test_large_models_get_halfvec(database_url: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    slot = init_target(database_url, make_target(database_url, model="text-embedding-3-large",
                                                 dimensions=3072))
    assert slot.vector_type == "halfvec"


def test_missing_pgvector_is_a_clear_error() -> None:
    """Against a real server without pgvector (this machine's Debian PostgreSQL, if running)."""
    import os

    dsn = os.environ.get("NO_PGVECTOR_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            has_vector = conn.execute("SELECT count(*) FROM pg_available_extensions"
                                      " WHERE name = 'vector'").fetchone() != (0,)
    except psycopg.OperationalError:
        pytest.skip("no Postgres without pgvector reachable at " + dsn.split("@")[-1])
    if has_vector:
        pytest.skip("that server has pgvector")
    with pytest.raises(SetupError, match="pgvector is not installed on this Postgres server"):
        init_target(dsn, make_target(dsn))


def test_every_check_that_can_refuse_comes_before_enabling_pgvector(database_url: str) -> None:
    """A role that may change neither the table nor the extension: it is told about the
    table first (versions and rights are checked before CREATE EXTENSION, the one change),
    and nothing was changed."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP EXTENSION vector")
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    roles = create_ordinary_roles(database_url)
    try:
        with pytest.raises(SetupError, match="lacks what it needs: make it a member of the"
                                             " table's owner role"):
            init_target(roles.app_dsn, make_target(roles.app_dsn))
    finally:
        drop_ordinary_roles(database_url, roles)
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_extension WHERE extname = 'vector'"
                            ).fetchone() == (0,)


def test_a_configured_primary_key_must_identify_each_row(database_url: str) -> None:
    """primary_key = "title" (not unique, NULLs allowed) was taken: parents sharing a
    title, or without one, silently got no chunks (a new-user probe: 3 of 296), and an
    ordinary target's rows would get each other's vectors. init refuses it, naming what
    it needs, and takes the column once it is NOT NULL with a unique index."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, title text, body text)")
    target = make_target(database_url, primary_key="title")
    with pytest.raises(SetupError, match="primary_key 'title' of public.docs must identify"
                                         " each row: NOT NULL and a unique index"):
        init_target(database_url, target)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE UNIQUE INDEX docs_title ON docs (title)")
    with pytest.raises(SetupError, match="must identify each row"):  # NULLs still allowed
        init_target(database_url, target)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE docs ALTER COLUMN title SET NOT NULL")
    assert init_target(database_url, target).primary_key == "title"


def test_init_of_several_targets_says_which_were_initialised_before_one_failed(
        stack: Stack) -> None:
    """The second target's table is missing: its error says nothing changed (for it), and
    a line says the first target is initialised all the same."""
    write_config(stack.config_path, docs_config() + """
[[target]]
name = "notes"
table = "public.notes_missing"
text_columns = ["body"]
vector_column = "embedding"
provider = "openai"
model = "fake-384"
dimensions = 384
""")
    seed(stack, 3)
    result = stack.cli("init")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "init: target docs: column embedding" in result.stdout, result.stdout
    assert "pgreembed: init: docs initialised before notes failed (" in result.stderr, result.stderr
    with stack.connect() as conn:
        assert conn.execute("SELECT target FROM pgreembed.slots").fetchall() == [("docs",)]
