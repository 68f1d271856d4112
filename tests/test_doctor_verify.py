"""`pgreembed doctor --verify N`: re-embed a sample and find vectors that are not their text's.

A real fill (worker + `tick --wait`, then a migration's new column filled by the
scheduler), then a few rows are corrupted with the exact vector ANOTHER model gives
for their own text: doctor finds exactly those, in the column where they are.
"""

from __future__ import annotations

from typing import Any

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from pgreembed.config import parse_settings
from pgreembed.operations.doctor.checks import run_doctor
from pgreembed.operations.doctor.findings import ERROR, OK
from pgreembed.operations.verify import sample_query
from pgreembed.store.setup import init_target
from pgreembed.store.slots import load_slots
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from tests.helpers import API_KEY, Stack, counts, json_document, seed, start_migration, wait_for


def filled(stack: Stack, column: str) -> bool:
    with stack.connect() as conn:
        row = conn.execute(f"SELECT count(*) FROM docs WHERE {column} IS NULL").fetchone()
    return row is not None and row[0] == 0


def corrupt(stack: Stack, column: str, keys: list[int], model: str, dims: int) -> None:
    """Write the vector `model` gives for each row's own text (the trigger keeps it)."""
    with stack.connect() as conn:
        register_vector(conn)
        for key in keys:
            row = conn.execute("SELECT concat_ws(E'\\n', title, body) FROM docs WHERE id = %s",
                               (key,)).fetchone()
            assert row is not None
            conn.execute(f"UPDATE docs SET {column} = %s WHERE id = %s",
                         (fake_vector(model, row[0], dims), key))


def verify(stack: Stack, rows: int, *extra: str) -> tuple[int, list[dict[str, Any]], str]:
    """(exit code, the `verify` findings' details, stderr) of `doctor --verify rows --json`."""
    result = stack.cli("doctor", "--verify", str(rows), "--json", *extra)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    findings = json_document(result.stdout)["findings"]
    details = [f["details"] for f in findings if f["check"] == "verify"]
    assert all(f["level"] in (OK, ERROR) for f in findings if f["check"] == "verify")
    return result.returncode, details, result.stderr


def by_column(details: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["column"]: d for d in details}


def test_verify_finds_exactly_the_corrupted_rows_in_live_and_incoming_columns(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    seed(stack, 40)
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=2)
    tick = stack.cli("tick", "--wait", "--timeout", "90")
    assert tick.returncode == 0, tick.stdout + tick.stderr
    assert filled(stack, "embedding")

    # A clean table: every sampled row agrees, exit 0, the spend is announced first.
    code, details, notices = verify(stack, 1000)
    assert code == 0
    [live] = details
    assert (live["column"], live["role"], live["sampled"]) == ("embedding", "live", 40)
    assert live["disagreements"] == [] and live["tolerance"] == 0.99
    assert live["tokens_counted"] > 0 and live["tokens_billed"] > 0
    assert counts(r"re-embedding (\d+) sampled rows", notices) == [(40,)], notices

    # A row edited behind the trigger's back: its vector is of the old text. It is
    # pending (its text no longer hashes to what was embedded), not corrupt.
    with stack.connect() as conn:
        conn.execute("ALTER TABLE docs DISABLE TRIGGER pgreembed_clear_docs")
        conn.execute("UPDATE docs SET body = 'edited since' WHERE id = 7")
        conn.execute("ALTER TABLE docs ENABLE TRIGGER pgreembed_clear_docs")
    corrupt(stack, "embedding", [3, 11, 29], "other-384", 384)
    code, details, _ = verify(stack, 1000)
    assert code == 1
    [live] = details
    assert live["sampled"] == 39  # every row but the edited one
    assert sorted(d["key"] for d in live["disagreements"]) == [3, 11, 29]
    assert all(d["cosine"] < 0.5 for d in live["disagreements"])

    # During a migration the incoming column is verified with its own model.
    new_column = start_migration(stack, "--model", "fake-768", "--dimensions", "768")
    stack.start_scheduler()
    wait_for(lambda: filled(stack, new_column) and filled(stack, "embedding"), timeout=90,
             interval=0.3, message="both columns filled")
    corrupt(stack, new_column, [5], "other-768", 768)
    code, details, _ = verify(stack, 1000)
    assert code == 1
    columns = by_column(details)
    assert set(columns) == {"embedding", new_column}
    assert columns[new_column]["role"] == "next"
    assert columns[new_column]["model"] == "openai:fake-768@768"
    assert [d["key"] for d in columns[new_column]["disagreements"]] == [5]
    assert sorted(d["key"] for d in columns["embedding"]["disagreements"]) == [3, 11, 29]
    # The edited row's new text is in the new column; the live one still has the old.
    assert (columns["embedding"]["sampled"], columns[new_column]["sampled"]) == (39, 40)


def test_verify_samples_a_big_table_in_blocks(database_url: str,
                                              fake_openai: FakeOpenAIServer) -> None:
    """Above 20x the sample size, TABLESAMPLE SYSTEM: exactly N rows, some corrupted ones
    found among them, a clean sample passes."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        conn.execute("INSERT INTO docs SELECT g, 'text number ' || g"
                     " FROM generate_series(1, 2000) g")
    settings = parse_settings({"target": [{
        "name": "docs", "table": "docs", "text_column": "body", "vector_column": "embedding",
        "provider": "openai", "model": "fake-384", "dimensions": 384}]},
        {"DATABASE_URL": database_url, "OPENAI_BASE_URL": fake_openai.base_url,
         "OPENAI_API_KEY": API_KEY})
    init_target(database_url, settings.target("docs"))
    with psycopg.connect(database_url, autocommit=True) as conn:
        register_vector(conn)
        texts = conn.execute("SELECT id, body FROM docs ORDER BY id").fetchall()
        # Every other row carries another model's vector; the rest the right one.
        with conn.cursor() as cur:
            cur.executemany("UPDATE docs SET embedding = %s WHERE id = %s",
                            [(fake_vector("fake-384" if key % 2 else "wrong-384", text, 384),
                              key) for key, text in texts])
        slot = conn.execute("SELECT id, model_id FROM pgreembed.slots").fetchone()
        assert slot is not None
        conn.execute(f"INSERT INTO pgreembed.slot_{slot[0]} (pgr_pk, pgr_model_id, pgr_hash)"
                     " SELECT id, %s, md5(coalesce(body::text, ''))::uuid FROM docs",
                     (slot[1],))
        conn.execute("ANALYZE docs")
    announced: list[str] = []
    findings = run_doctor(settings, verify_rows=10, announce=announced.append)
    [found] = [f for f in findings if f.check == "verify"]
    assert found.details is not None and found.level == ERROR
    assert found.details["sampled"] == 10
    keys = [d["key"] for d in found.details["disagreements"]]
    assert keys and all(key % 2 == 0 for key in keys)
    assert announced
    assert counts(r"re-embedding (\d+) sampled rows", announced[0]) == [(10,)], announced

    # The block sample reads a few pages of the table, and the bookkeeping by key.
    with psycopg.connect(database_url) as conn:
        [slot_row] = load_slots(conn, settings.target("docs"))
        pages = conn.execute("SELECT relpages FROM pg_class WHERE oid = 'docs'::regclass"
                             ).fetchone()
        assert pages is not None
        explained = conn.execute(sql.SQL("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ") +
                                 sample_query(slot_row, 2.5), (slot_row.model_id, 10)
                                 ).fetchone()
    assert explained is not None
    plan = explained[0][0]["Plan"]
    nodes = list(walk(plan))
    [sampled] = [n for n in nodes if n["Node Type"] == "Sample Scan"]
    assert sampled["Shared Hit Blocks"] + sampled["Shared Read Blocks"] < pages[0] / 4
    # The state table only by key: no node that reads a table whole.
    assert {n["Node Type"] for n in nodes} <= {
        "Limit", "Sort", "Nested Loop", "Sample Scan", "Subquery Scan", "Index Scan",
        "Index Only Scan"}, [n["Node Type"] for n in nodes]


def walk(node: dict[str, Any]) -> Any:
    yield node
    for child in node.get("Plans", []):
        yield from walk(child)
