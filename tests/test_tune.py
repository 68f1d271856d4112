"""`pgreembed tune`, `doctor --recall` and search applying the recommendation, on real
Postgres + pgvector with the fake model's exact vectors.

3000 random-looking unit vectors in an IVFFlat index of 30 lists: a row's true
neighbours are spread over all lists, so `ivfflat.probes = 1` finds little more than
the row itself (recall@10 ~0.13) and recall rises with probes: the sweep has
something to find, and the answer is known without trusting our own measuring.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.pq import TransactionStatus

from pgreembed.config import Settings, load_settings
from pgreembed.operations.search import search
from pgreembed.store.pool import connect
from pgreembed.testing.fake_vectors import fake_vectors
from tests.helpers import Stack, fill, json_document, seed, vector_texts

MODEL, DIMS, ROWS, LISTS = "fake-384", 384, 3000, 30


def ivfflat_table(stack: Stack) -> dict[int, str]:
    seed(stack, ROWS)
    init = stack.cli("init")
    assert init.returncode == 0, init.stderr
    with stack.connect() as conn:
        texts = fill(conn, "embedding", MODEL)
        conn.execute(f"CREATE INDEX docs_embedding_idx ON docs USING ivfflat"
                     f" (embedding vector_cosine_ops) WITH (lists = {LISTS})")
        conn.execute("ANALYZE docs")
    return texts


def tune_json(stack: Stack, *args: str) -> tuple[int, dict[str, Any]]:
    out = stack.cli("tune", "--target", "docs", "--json", *args, timeout=300)
    assert out.returncode in (0, 4), out.stdout + out.stderr
    return out.returncode, json_document(out.stdout)


def exact_top(conn: psycopg.Connection, text_vector: str, k: int) -> list[int]:
    with conn.transaction():
        conn.execute("SET LOCAL enable_indexscan = off")
        return [r[0] for r in conn.execute(
            "SELECT id FROM docs ORDER BY embedding <=> %s::vector LIMIT %s",
            (text_vector, k))]


def settings_of(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for name in ("DATABASE_URL", "PGREEMBED_CONFIG", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
        monkeypatch.setenv(name, stack.env[name])
    return load_settings()


def search_recall(conn: psycopg.Connection, settings: Settings, texts: dict[int, str],
                  keys: list[int], k: int, **options: Any) -> float:
    """Recall@k of `search`'s hits against exact search, for rows' own texts as queries."""
    scores = []
    with connect(settings.database_url, autocommit=True) as truth_conn:
        for key in keys:
            hits = search(conn, settings, "docs", texts[key], limit=k, **options)
            vector = vector_texts(fake_vectors(MODEL, [texts[key]], DIMS))[0]
            truth = exact_top(truth_conn, vector, k)
            scores.append(len({h.key for h in hits} & set(truth)) / len(truth))
    return float(np.mean(scores))


def test_tune_recommends_the_smallest_probes_reaching_the_target_and_search_applies_it(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = ivfflat_table(stack)
    code, report = tune_json(stack, "--recall", "0.9", "--queries", "40")
    assert code == 0
    assert report["index"]["method"] == "ivfflat"
    assert report["index"]["options"] == {"lists": str(LISTS)}
    # The server's default (probes = 1) misses most neighbours.
    assert report["current"]["settings"] == {"ivfflat.probes": "1"}
    assert report["current"]["recall"] < 0.4
    sweep = report["sweep"]
    probes = [int(m["settings"]["ivfflat.probes"]) for m in sweep]
    assert probes == sorted(probes) and probes[0] == 1
    recalls = [m["recall"] for m in sweep]
    assert recalls[-1] > recalls[0] + 0.4  # recall rises with probes
    recommended = report["recommended"]
    assert recommended == sweep[-1] and recommended["reached"] is True
    assert recommended["recall"] >= 0.9
    assert all(m["recall"] < 0.9 and m["reached"] is False for m in sweep[:-1])
    assert report["set_statements"] == [
        f"""SET "ivfflat"."probes" = '{probes[-1]}';"""]
    with stack.connect() as conn:
        row = conn.execute("SELECT s.settings, s.recall, s.index_name FROM"
                           " pgreembed.index_settings s JOIN pgreembed.slots l"
                           " ON l.id = s.slot_id WHERE l.role = 'live'").fetchone()
        assert row is not None
        assert row[0] == {"ivfflat.probes": str(probes[-1])}
        assert row[1] == pytest.approx(recommended["recall"])
        assert row[2] == "docs_embedding_idx"
        # The printed statement is valid SQL.
        with conn.transaction():
            conn.execute(report["set_statements"][0].replace("SET", "SET LOCAL", 1))
            assert conn.execute("SHOW ivfflat.probes").fetchone() == (str(probes[-1]),)

    settings = settings_of(stack, monkeypatch)
    sample = list(texts)[::100]
    # An idle connection: the recorded probes are used, and do not stay on the session.
    with connect(settings.database_url) as conn:
        tuned = search_recall(conn, settings, texts, sample, 10)
        assert conn.info.transaction_status == TransactionStatus.IDLE
        assert conn.execute("SHOW ivfflat.probes").fetchone() == ("1",)
        conn.rollback()
        assert tuned >= 0.85
        # The caller's override wins: the server's probes = 1 again.
        untuned = search_recall(conn, settings, texts, sample, 10,
                                index_settings={"ivfflat.probes": 1})
    assert untuned < 0.4

    # Inside the app's own transaction: the app's setting is untouched and still in force
    # afterwards, our statement used the recorded one, the transaction is still the app's.
    with connect(settings.database_url) as conn:
        conn.execute("SET LOCAL ivfflat.probes = 2")
        in_app = search_recall(conn, settings, texts, sample, 10)
        assert conn.info.transaction_status == TransactionStatus.INTRANS
        assert conn.execute("SHOW ivfflat.probes").fetchone() == ("2",)
        conn.rollback()
    assert in_app >= 0.85


def test_doctor_recall_reports_each_index_and_warns_below_the_target(stack: Stack) -> None:
    ivfflat_table(stack)

    def recall_findings() -> list[dict[str, Any]]:
        out = stack.cli("doctor", "--json", "--recall", "--recall-queries", "30", timeout=300)
        assert out.returncode in (0, 1), out.stdout + out.stderr
        return [f for f in json_document(out.stdout)["findings"] if f["check"] == "recall"]

    [untuned] = recall_findings()
    assert untuned["level"] == "warn"
    details = untuned["details"]
    assert (details["column"], details["role"], details["index"]["name"]) == (
        "embedding", "live", "docs_embedding_idx")
    assert details["recall"] < 0.4 and details["target_recall"] == 0.95
    assert details["settings"] == {}  # what search applies: nothing recorded yet

    code, report = tune_json(stack, "--recall", "0.9", "--queries", "30")
    assert code == 0
    [tuned] = recall_findings()
    assert tuned["details"]["settings"] == report["recommended"]["settings"]
    assert tuned["details"]["recall"] > 0.8
    # The target is the one tune was given, unless --recall-target says otherwise.
    assert tuned["details"]["target_recall"] == 0.9
