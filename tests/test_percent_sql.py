"""Operator-written SQL with `%` in it (text_sql's format() and LIKE, probe_sql, tune's
--filter): psycopg reads `%` as a placeholder in any query run with parameters, so each
such fragment must reach Postgres unchanged through every query that composes it. One
setup goes through every command that runs it; percent_guard records any statement sent
without parameters that still holds the doubled `%%` (which runs, but on other SQL)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np

from pgreembed.testing.fake_vectors import fake_vector
from tests.helpers import (
    ROOT,
    Stack,
    json_document,
    migrate,
    start_migration,
    steady_writer,
    wait_filled,
    write_config,
)

TEXT_SQL = ("format('%s: %s', title, body)"
            " || CASE WHEN title LIKE '%x%' THEN ' (100% x)' ELSE '' END")

FILTER = "id % 3 = 0 AND title LIKE '%o%'"

CONFIG = f"""
[[target]]
name = "docs"
table = "public.docs"
text_sql = "{TEXT_SQL}"
text_columns = ["title", "body"]
vector_column = "embedding"
provider = "openai"
model = "fake-384"
dimensions = 384
batch_size = 8

[worker]
poll_interval = 0.5

[throttle]
max_rows_per_second = 1000
adaptive = true
probe_sql = "SET LOCAL enable_seqscan = off; SELECT count(*) FROM docs WHERE title LIKE '%x%'"
max_probe_ms = 1000
"""


def assert_vectors_current(stack: Stack, column: str, model: str, dims: int) -> None:
    """Each row's vector is `model`'s vector of the text Postgres makes of it with
    TEXT_SQL (run here without parameters: psycopg leaves the `%` alone)."""
    with stack.connect() as conn:
        rows = conn.execute(f"SELECT id, {TEXT_SQL}, {column}::text FROM docs ORDER BY id"
                            ).fetchall()
    assert rows and any(text.endswith("(100% x)") for _, text, _ in rows)
    for key, text, vector in rows:
        assert vector is not None, f"row {key}: no vector in {column}"
        got = np.array([float(x) for x in vector.strip("[]").split(",")], dtype=np.float32)
        np.testing.assert_allclose(got, fake_vector(model, text, dims), atol=2e-3,
                                   err_msg=f"row {key}: {column} is not {model}({text!r})")


def ok(result: subprocess.CompletedProcess[str], what: str) -> str:
    assert result.returncode == 0, f"{what}: {result.stdout}{result.stderr}"
    return result.stdout


GUARD = Path(__file__).resolve().parent / "percent_guard"


def test_percent_in_trusted_sql_works_everywhere(stack: Stack, fake_openai,  # type: ignore[no-untyped-def]
                                                  tmp_path: Path) -> None:
    write_config(stack.config_path, CONFIG)
    unprocessed = tmp_path / "unprocessed.log"  # see percent_guard/sitecustomize.py
    stack.env.update(PYTHONPATH=f"{GUARD}{os.pathsep}{ROOT}",
                     PGREEMBED_TEST_PERCENT_LOG=str(unprocessed))
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (title, body) SELECT CASE WHEN g % 4 = 0 THEN 'box '"
                     " || g ELSE 'doc ' || g END, 'body ' || g FROM generate_series(1, 40) g")
    ok(stack.cli("init"), "init")
    with stack.connect() as conn:
        conn.execute("CREATE INDEX docs_embedding_idx ON docs USING hnsw"
                     " (embedding vector_cosine_ops)")
    fake_openai.set_faults(slow_model="fake-768", slow_model_latency=0.05)
    stack.start_worker(threads=4)
    stack.start_scheduler()
    wait_filled(stack, "embedding")
    assert_vectors_current(stack, "embedding", "fake-384", 384)

    plan = json_document(migrate(stack, "plan", "--model", "fake-768", "--dimensions", "768",
                                 "--json"))
    assert plan["command"] == "migrate-plan"
    with stack.connect() as conn:
        conn.execute("ANALYZE docs")  # status counts from the estimate, then exactly
    for exact in ([], ["--exact"]):
        status = json_document(ok(stack.cli("status", "--json", *exact), "status"))
        [live] = status["columns"]
        assert (live["total"], live["pending"], live["failed"]) == (40, 0, 0), live
        assert live["estimated"] is not bool(exact)
    failures = json_document(ok(stack.cli("failures", "--target", "docs", "--json"),
                                "failures"))
    assert failures["failures"] == []
    ok(stack.cli("failures", "--target", "docs", "--retry"), "failures --retry")
    hits = ok(stack.cli("search", "--target", "docs", "box 4: body 4 (100% x)"), "search")
    assert hits.splitlines()[0].split()[1] == "4"
    doctor = json_document(ok(stack.cli("doctor", "--target", "docs", "--json", "--verify",
                                        "10"), "doctor"))
    assert not [f for f in doctor["findings"] if f["level"] == "error"], doctor
    [throttle] = [f for f in doctor["findings"] if f["check"] == "throttle"]
    assert "probe_ms" in throttle["details"], throttle

    with steady_writer(stack, per_second=5, edits=range(1, 41)):
        new_column = start_migration(stack, "--model", "fake-768", "--dimensions", "768")
        wait_filled(stack, new_column)
        migrate(stack, "index")
        migrate(stack, "compare", "--sample", "10")
        assert "swap done" in migrate(stack, "swap")
    wait_filled(stack, "embedding")
    wait_filled(stack, new_column)
    assert_vectors_current(stack, "embedding", "fake-768", 768)
    assert_vectors_current(stack, new_column, "fake-384", 384)

    tuned = json_document(ok(stack.cli("tune", "--target", "docs", "--json", "--queries",
                                       "10", "--filter", FILTER, timeout=300), "tune"))
    assert tuned["filter"] == FILTER and tuned["recommended"]["reached"] is True
    assert not unprocessed.exists(), unprocessed.read_text()
