"""The clear trigger watches every column `text_sql` reads, not only `text_columns`."""

from __future__ import annotations

import psycopg
import pytest

from pgreembed.errors import SetupError
from pgreembed.store.setup import init_target
from tests.helpers import make_target

TEXT_SQL = "title || ': ' || body || coalesce(' #' || (data->>'tag'), '')"


def has_vector(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT embedding IS NOT NULL FROM docs WHERE id = 1").fetchone()
    assert row is not None
    return bool(row[0])


def embed(conn: psycopg.Connection) -> None:
    conn.execute("UPDATE docs SET embedding = array_fill(0.1, ARRAY[384])::vector WHERE id = 1")
    assert has_vector(conn)


@pytest.fixture
def conn(database_url: str):  # type: ignore[no-untyped-def]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, title text, body text,"
                     " data jsonb, views int NOT NULL DEFAULT 0)")
        conn.execute("INSERT INTO docs (id, title, body, data)"
                     """ VALUES (1, 't', 'b', '{"tag": "x"}')""")
        yield conn


def test_columns_only_text_sql_reads_clear_the_vector(database_url: str,
                                                       conn: psycopg.Connection) -> None:
    init_target(database_url, make_target(database_url, text_sql=TEXT_SQL))
    for change in ["title = 'new title'", "body = 'new body'",
                   """data = '{"tag": "y"}'"""]:
        embed(conn)
        conn.execute(f"UPDATE docs SET {change} WHERE id = 1")
        assert not has_vector(conn), f"SET {change} left the vector of the old text"
    embed(conn)
    conn.execute("UPDATE docs SET views = views + 1, data = data WHERE id = 1")
    assert has_vector(conn), "an unrelated change (or no change) cleared the vector"


def test_an_edited_text_sql_recreates_the_triggers(database_url: str,
                                                   conn: psycopg.Connection) -> None:
    init_target(database_url, make_target(database_url, text_sql=TEXT_SQL))
    init_target(database_url, make_target(database_url, text_sql="body"))
    embed(conn)
    conn.execute("UPDATE docs SET title = 'no longer part of the text' WHERE id = 1")
    assert has_vector(conn), "the triggers still watch the old expression's columns"
    init_target(database_url, make_target(database_url, text_sql="views::text || body"))
    conn.execute("UPDATE docs SET views = 7 WHERE id = 1")
    assert not has_vector(conn), "the triggers do not watch the new expression's columns"


@pytest.mark.parametrize(("text_sql", "message"), [
    ("docs::text", r"target 'docs'.text_sql reads the whole row of public.docs"),
    ("title || nope", r"target 'docs'.text_sql: Postgres cannot evaluate it over public.docs:"
                      r' column "nope" does not exist'),
    ("embedding::text", r"target 'docs'.text_sql reads the vector column\(s\) embedding"),
])
def test_unusable_text_sql_is_refused(database_url: str, conn: psycopg.Connection,
                                      text_sql: str, message: str) -> None:
    if "embedding" in text_sql:
        conn.execute("ALTER TABLE docs ADD COLUMN embedding vector(384)")
    with pytest.raises(SetupError, match=message):
        init_target(database_url, make_target(database_url, text_sql=text_sql))
