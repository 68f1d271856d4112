"""`pgreembed migrate compare` and the comparison `migrate swap` shows, on real services.

The live model is fake-384. Two incoming models whose quality is known: an identical
copy of it (the fake server's `degraded_models` with noise 0), and a degraded copy
(fresh noise on every call, so a row's stored vector and its text's query vector
differ). The comparison must find the copy as good as the live model and the noisy
one worse, and keep the spend cap.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import openai
from psycopg import sql

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    API_KEY,
    Stack,
    fill,
    json_document,
    seed,
    start_migration,
    vector_texts,
)

ROWS, DIMS = 1000, 384
COPY, NOISY = "fake-copy-384", "text-embedding-3-small"  # NOISY has a list price: a cap


def fill_through_server(stack: Stack, fake: FakeOpenAIServer, column: str, model: str
                        ) -> None:
    """Write what the workers would: the vectors the server answers for each row's text."""
    client = openai.OpenAI(api_key=API_KEY, base_url=fake.base_url)
    with stack.connect() as conn:
        rows = conn.execute("SELECT id, concat_ws(E'\\n', title, body) FROM docs ORDER BY id"
                            ).fetchall()
        vectors = []
        for start in range(0, len(rows), 500):
            answer = client.embeddings.create(model=model, dimensions=DIMS, input=[
                text for _, text in rows[start:start + 500]])
            vectors += [d.embedding for d in answer.data]
        with conn.cursor() as cur:
            cur.executemany(sql.SQL("UPDATE docs SET {} = %s::vector WHERE id = %s").format(
                sql.Identifier(column)), [(v, key) for v, (key, _) in zip(
                    vector_texts(np.asarray(vectors)), rows, strict=True)])


def filled_migration(stack: Stack, fake: FakeOpenAIServer, model: str, *extra: str) -> str:
    """A migration to `model`, its column filled through the server and indexed; the column."""
    column = start_migration(stack, "--model", model, "--dimensions", str(DIMS), *extra)
    fill_through_server(stack, fake, column, model)
    out = stack.cli("migrate", "index", "--target", "docs")
    assert out.returncode == 0, out.stderr
    return column


def compare(stack: Stack, *args: str) -> dict[str, Any]:
    out = stack.cli("migrate", "compare", "--target", "docs", "--json", *args, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return json_document(out.stdout)


def swap(stack: Stack, step: str = "swap") -> dict[str, Any]:
    out = stack.cli("migrate", step, "--target", "docs", "--json", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    return json_document(out.stdout)


def test_compare_ranks_an_identical_model_above_a_degraded_one_and_swap_shows_it(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    fake_openai.set_faults(degraded_models={
        COPY: {"copy_of": "fake-384", "noise": 0.0},
        NOISY: {"copy_of": "fake-384", "noise": 3.0}})
    seed(stack, ROWS)
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        fill(conn, "embedding", "fake-384")
        conn.execute("CREATE INDEX docs_embedding_idx ON docs USING hnsw"
                     " (embedding vector_cosine_ops)")

    # An identical copy. A swap with no comparison warns, and its JSON says so.
    copy_column = filled_migration(stack, fake_openai, COPY)
    out = stack.cli("migrate", "swap", "--target", "docs", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["comparison"] is None
    assert "warning: no `pgreembed migrate compare" in out.stderr
    swap(stack, "rollback")
    before = fake_openai.stats()["inputs_embedded"]
    report = compare(stack, "--sample", "40")
    assert fake_openai.stats()["inputs_embedded"] - before == 80  # 40 queries x 2 models
    assert (report["mode"], report["queries"], report["k"]) == ("sample", 40, 10)
    live, incoming = report["columns"]["live"], report["columns"]["incoming"]
    assert (live["column"], incoming["column"]) == ("embedding", copy_column)
    assert live["self_recall_at_1"] == incoming["self_recall_at_1"] == 1.0
    assert live["self_recall_at_k"] == incoming["self_recall_at_k"] == 1.0
    assert report["overlap_at_k"] >= 0.99
    for column in (live, incoming):
        assert column["index"]["method"] == "hnsw"
        assert 0.5 <= column["recall"] <= 1.0
        assert 0 < column["p50_ms"] <= column["p99_ms"]
    assert stack.cli("migrate", "finalize", "--target", "docs").returncode == 0

    # A degraded copy, under a spend cap too small for the comparison: refused, unspent.
    noisy_column = filled_migration(stack, fake_openai, NOISY, "--spend-cap", "0.000001")
    before = fake_openai.stats()["inputs_embedded"]
    refused = stack.cli("migrate", "compare", "--target", "docs", "--sample", "40")
    assert refused.returncode == 4
    assert "spend cap" in refused.stderr
    assert fake_openai.stats()["inputs_embedded"] == before
    assert stack.cli("migrate", "resume", "--target", "docs", "--spend-cap", "1"
                     ).returncode == 0
    report = compare(stack, "--sample", "40")
    live, incoming = report["columns"]["live"], report["columns"]["incoming"]
    assert (live["model"], incoming["column"]) == ("openai:fake-384@384", noisy_column)
    assert live["self_recall_at_1"] == 1.0
    assert incoming["self_recall_at_1"] < 0.9
    assert incoming["self_recall_at_k"] <= 1.0
    assert report["overlap_at_k"] < 0.9
    # The incoming model's tokens count against the migration's cap, like the fill's.
    status = json.loads(stack.cli("migrate", "status", "--target", "docs", "--json").stdout)
    assert status["tokens"] == report["tokens"]["incoming"]["tokens_billed"] > 0

    # Queries from a file: recall and overlap, no self-recall.
    queries = stack.config_path.parent / "queries.txt"
    queries.write_text("how do I compress a file?\n\nparse a date\nopen a socket\n")
    from_file = compare(stack, "--queries", str(queries), "--k", "5")
    assert (from_file["mode"], from_file["queries"], from_file["k"]) == ("queries", 3, 5)
    assert "self_recall_at_1" not in from_file["columns"]["incoming"]

    # The swap shows the last comparison (in --json: the stored report).
    swapped = swap(stack)
    shown = swapped["comparison"]
    measured = {key: value for key, value in from_file.items()
                if key not in ("command", "version")}  # the document's envelope
    assert {key: shown[key] for key in measured} == measured
