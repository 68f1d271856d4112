"""Printed SQL is safe to paste: `doctor` and `migrate plan` quote every identifier.

A schema, table and vector column whose names carry quotes, spaces, semicolons and
`drop table y;--`: every statement the commands advise is run through psycopg as
printed; table y survives, and each statement does what it says.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgreembed.config import parse_settings
from pgreembed.store.setup import init_target
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import API_KEY, ROOT, json_document

SCHEMA = 'My "Schema"; drop table y;--'
TABLE = 'Docs "x"; drop table y;--'
VECTOR = 'emb "v"; drop table y;--'
TABLE_ID = sql.Identifier(SCHEMA, TABLE)


def setup(dsn: str, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """The hostile table with 30 rows, initialised; its config file and CLI environment."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE y (id int)")
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(SCHEMA)))
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, body text)").format(TABLE_ID))
        conn.execute(sql.SQL("INSERT INTO {} SELECT g, 'text ' || (g % 10)"
                             " FROM generate_series(1, 30) g").format(TABLE_ID))
    raw = {"name": "docs", "table": f"{SCHEMA}.{TABLE}", "text_column": "body",
           "vector_column": VECTOR, "provider": "openai", "model": "fake-384", "dimensions": 384}
    init_target(dsn, parse_settings({"target": [raw]}, {"DATABASE_URL": dsn}).target("docs"))
    # json.dumps of a str is a valid TOML basic string (same escapes for " and \).
    body = "[[target]]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in raw.items())
    config = tmp_path / "pgreembed.toml"
    config.write_text(body)
    env = {**os.environ, "DATABASE_URL": dsn, "PGREEMBED_CONFIG": str(config),
           "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": API_KEY}
    return config, env


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgreembed", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def advice(env: dict[str, str], check: str) -> list[str]:
    """The SQL `doctor --json` advises under `check` (from the findings' details)."""
    result = cli(env, "doctor", "--json")
    findings = json_document(result.stdout)["findings"]
    return [statement for f in findings if f["check"] == check and "details" in f
            for statement in f["details"]["sql"]]


def run(dsn: str, statement: str) -> None:
    """As pasted into psql: autocommit, the statement exactly as printed."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(statement.encode())


def y_exists(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT to_regclass('public.y') IS NOT NULL").fetchone() == (True,)


def indexes(dsn: str) -> dict[str, dict[str, Any]]:
    """Index name -> column, method, opclass, valid, predicate, of the hostile table."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            """
            SELECT c.relname, a.attname, am.amname, o.opcname, i.indisvalid,
                   pg_get_expr(i.indpred, i.indrelid)
            FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
            JOIN pg_am am ON am.oid = c.relam
            JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
            JOIN pg_opclass o ON o.oid = i.indclass[0]
            WHERE i.indrelid = %s::regclass AND NOT i.indisprimary
            """, (TABLE_ID.as_string(conn),)).fetchall()
    return {name: {"column": column, "method": method, "opclass": opclass, "valid": valid,
                   "predicate": predicate}
            for name, column, method, opclass, valid, predicate in rows}


def ann_indexes(dsn: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in indexes(dsn).items() if v["method"] in ("hnsw", "ivfflat")}


def test_doctor_advice_runs_as_printed_with_hostile_names(database_url: str,
                                                          tmp_path: Path) -> None:
    _, env = setup(database_url, tmp_path)

    # No ANN index: the advised CREATE INDEX builds the cosine HNSW index on the column.
    [create] = advice(env, "index")
    run(database_url, create)
    assert y_exists(database_url)
    [(built, found)] = ann_indexes(database_url).items()
    assert (found["column"], found["method"], found["opclass"], found["valid"]) == (
        VECTOR, "hnsw", "vector_cosine_ops", True)

    # An index of the wrong distance and an INVALID index, both with hostile names.
    bad_name, invalid_name = 'l2 "i"; drop table y;--', 'uniq "u"; drop table y;--'
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(SCHEMA, built)))
        conn.execute(sql.SQL("CREATE INDEX {} ON {} USING hnsw ({} vector_l2_ops)").format(
            sql.Identifier(bad_name), TABLE_ID, sql.Identifier(VECTOR)))
        # The texts repeat: the unique build fails and leaves an INVALID index.
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            conn.execute(sql.SQL("CREATE UNIQUE INDEX CONCURRENTLY {} ON {} (body)").format(
                sql.Identifier(invalid_name), TABLE_ID))
    assert indexes(database_url)[invalid_name]["valid"] is False
    [drop] = advice(env, "index_invalid")
    [build] = advice(env, "index_opclass")
    run(database_url, drop)
    run(database_url, build)
    assert y_exists(database_url)
    after = indexes(database_url)
    assert invalid_name not in after
    assert {(v["column"], v["opclass"]) for v in ann_indexes(database_url).values()} == {
        (VECTOR, "vector_l2_ops"), (VECTOR, "vector_cosine_ops")}
    # Nothing left to advise (the l2 index is still reported, with no index to build).
    assert advice(env, "index_invalid") == advice(env, "index_opclass") == []


def test_migrate_plan_sql_runs_as_printed_with_hostile_names(
        database_url: str, tmp_path: Path, fake_openai: FakeOpenAIServer) -> None:
    _, env = setup(database_url, tmp_path)
    env["OPENAI_BASE_URL"] = fake_openai.base_url
    app_index = 'app idx "a"; drop table y;--'
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE INDEX {} ON {} USING hnsw ({} vector_cosine_ops)").format(
            sql.Identifier(app_index), TABLE_ID, sql.Identifier(VECTOR)))
    result = cli(env, "migrate", "plan", "--target", "docs", "--model", "fake-768",
                 "--dimensions", "768")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("SQL:") + 1
    printed = []
    for line in lines[start:]:
        if not line.startswith("  "):
            break
        printed.append(line[2:])
    statements = [s for s in printed if not s.startswith("--")]
    assert len(statements) == 4, printed  # add column, pending index, ANN index, swap
    # The note on the table's fillfactor (it has an ANN index, pages filled full): its SQL
    # sets, then resets, the storage parameter of the hostile table, and nothing else.
    fillfactor = [sql_text for line in lines if line.startswith("note: ") and "fillfactor" in line
                  for sql_text in re.findall(r"`(ALTER TABLE [^`]*)`", line)]
    assert len(fillfactor) == 2, lines
    for statement, wanted in zip(fillfactor, (["fillfactor=70"], None), strict=True):
        run(database_url, statement)
        assert y_exists(database_url), statement
        with psycopg.connect(database_url) as conn:
            options = conn.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                                   (TABLE_ID.as_string(conn),)).fetchone()
        assert options == (wanted,), statement
    for statement in statements:
        run(database_url, statement)
        assert y_exists(database_url), statement

    # What the plan said: a 768-dim column, filled-check and ANN indexes on it, swapped
    # in under the live name, with the app's index name moved onto it.
    new_column = f"{VECTOR}__m<id>"
    with psycopg.connect(database_url) as conn:
        types = dict(conn.execute(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (TABLE_ID.as_string(conn),)).fetchall())
    assert types[VECTOR] == "vector(768)" and types[new_column] == "vector(384)"
    found = indexes(database_url)
    assert (found[app_index]["column"], found[app_index]["opclass"]) == (
        VECTOR, "vector_cosine_ops")
    assert found["pgreembed_ann_<slot>"]["column"] == new_column
    # The pending index's column was renamed by the swap too: it now covers VECTOR.
    with psycopg.connect(database_url) as conn:
        quoted = sql.Identifier(VECTOR).as_string(conn)
    pending = found["pgreembed_pending_<slot>"]
    assert (pending["column"], pending["predicate"]) == ("id", f"({quoted} IS NULL)")
