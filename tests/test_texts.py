"""One definition of "no text": SQL (plan, doctor, compare) and Python (the worker) agree."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from pgreembed.config.model_keys import model_key, parse_model_key
from pgreembed.store.texts import is_no_text, no_text

TEXTS = [None, "", " ", "\t\n", "\v\f\r ", "a", " a ", "\u00a0", "\u2003x"]


def test_sql_and_python_agree_on_no_text(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        for text in TEXTS:
            found = conn.execute(sql.SQL("SELECT {}").format(no_text(sql.Literal(text)))
                                 ).fetchone()
            assert found == (is_no_text(text),), repr(text)
    assert [is_no_text(t) for t in TEXTS] == [True, True, True, True, True, False, False,
                                              False, False]


@pytest.mark.parametrize("key", ["openai:text-embedding-3-small@1536",
                                 "local:all-MiniLM-L6-v2-onnx-int8@384",
                                 "openai:org:model@v2@768"])
def test_model_key_round_trips(key: str) -> None:
    assert model_key(*parse_model_key(key)) == key
