"""Grouped search of a chunked target: the best chunk of each of the nearest parents."""

from __future__ import annotations

import random

import numpy as np
import psycopg
import pytest

from pgreembed.config import load_settings
from pgreembed.errors import ConfigError
from pgreembed.operations.chunk_search import search_parents
from pgreembed.store.pool import connect
from pgreembed.testing.fake_vectors import fake_vector
from tests.helpers import Stack
from tests.test_chunked_targets import chunked_stack, drain, init

MODEL = "fake-384"


def fill_vectors(conn: psycopg.Connection) -> None:
    """Each chunk's vector as the fake provider would make it (what the workers write)."""
    rows = conn.execute("SELECT embedding_uuid, chunk FROM docs_chunks").fetchall()
    with conn.cursor() as cur:
        cur.executemany("UPDATE docs_chunks SET embedding = %s WHERE embedding_uuid = %s",
                        [(fake_vector(MODEL, text, 384), key) for key, text in rows])


def exact(conn: psycopg.Connection, query: str, limit: int) -> list[tuple[int, int, float]]:
    """Brute force: every chunk's cosine distance, min per parent, nearest parents."""
    q = fake_vector(MODEL, query, 384)
    best: dict[int, tuple[float, int]] = {}
    for key, seq, vector in conn.execute("SELECT id, chunk_seq, embedding FROM docs_chunks"):
        v = vector.to_numpy()
        d = 1 - float(np.dot(q, v) / (np.linalg.norm(q) * np.linalg.norm(v)))
        if key not in best or d < best[key][0]:
            best[key] = (d, seq)
    ranked = sorted(best.items(), key=lambda item: item[1][0])[:limit]
    return [(key, seq, d) for key, (d, seq) in ranked]


@pytest.mark.timeout(120)
def test_best_chunk_per_parent_even_when_one_parent_crowds_the_top(stack: Stack) -> None:
    settings = chunked_stack(stack)
    target = init(stack)
    rng = random.Random(5)
    crowd = "\n\n".join("the same words again and again " * 20 + f"({i})" for i in range(120))
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (id, title, body) VALUES (1, 'crowd', %s)", (crowd,))
        for key in range(2, 41):
            text = "\n\n".join(" ".join(rng.choice(["alpha", "beta", "gamma", "delta", "eps"])
                                        for _ in range(150)) for _ in range(3))
            conn.execute("INSERT INTO docs (id, title, body) VALUES (%s, 't', %s)",
                         (key, text))
    drain(stack.dsn, target)
    with stack.connect() as conn:
        fill_vectors(conn)
        chunks_of_1 = conn.execute("SELECT count(*) FROM docs_chunks WHERE id = 1"
                                   ).fetchone()[0]
        assert chunks_of_1 > 100  # more than the first 8 x 10 candidates
        # The query is one of parent 1's chunks, and all of parent 1's chunks lie near it:
        # the nearest 80+ chunks are all parent 1's.
        query = conn.execute("SELECT chunk FROM docs_chunks WHERE id = 1 AND chunk_seq = 3"
                             ).fetchone()[0]
        q = fake_vector(MODEL, query, 384)
        noise = np.random.default_rng(1)
        with conn.cursor() as cur:
            cur.executemany(
                "UPDATE docs_chunks SET embedding = %s WHERE id = 1 AND chunk_seq = %s",
                [(q + 0.02 * noise.standard_normal(384).astype(np.float32), seq)
                 for seq in range(chunks_of_1) if seq != 3])
        want = exact(conn, query, 10)
        top = conn.execute("SELECT id FROM docs_chunks ORDER BY embedding <=> %s LIMIT 80",
                           (q,)).fetchall()
        assert {k for (k,) in top} == {1}  # the first candidates hold one parent
    with connect(stack.dsn, autocommit=True) as app:
        hits = search_parents(app, settings, "docs", query, limit=10, index_settings={})
    assert [h.key for h in hits] == [k for k, _, _ in want]
    assert hits[0].key == 1 and hits[0].chunk == query and hits[0].distance < 1e-5
    assert [h.chunk_seq for h in hits] == [s for _, s, _ in want]
    np.testing.assert_allclose([h.distance for h in hits], [d for _, _, d in want], atol=1e-5)
    # With an HNSW index (ef_search 40 < the 80 candidates): iterative scans fill them.
    with stack.connect() as conn:
        conn.execute("CREATE INDEX ON docs_chunks USING hnsw (embedding vector_cosine_ops)")
    with connect(stack.dsn, autocommit=True) as app:
        app.execute("SET enable_seqscan = off")  # the table is small: make it use the index
        indexed = search_parents(app, settings, "docs", query, limit=10, index_settings={})
        assert app.execute("SHOW hnsw.iterative_scan").fetchone() == ("off",)
    assert len({h.key for h in indexed}) == 10 and indexed[0].key == 1
    recall = len({h.key for h in indexed} & {k for k, _, _ in want}) / 10
    assert recall >= 0.9, recall
    # In the app's own open transaction: runs in it and leaves it open, as search() does.
    with psycopg.connect(stack.dsn) as app:
        app.execute("SELECT 1")
        again = search_parents(app, settings, "docs", query, limit=10, index_settings={})
        assert [h.key for h in again] == [h.key for h in hits]
        assert app.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS


def test_refuses_a_target_that_is_not_chunked(stack: Stack) -> None:
    assert stack.cli("init").returncode == 0
    settings = load_settings(stack.config_path, stack.env)
    with connect(stack.dsn, autocommit=True) as app, pytest.raises(ConfigError,
                                                                   match="not chunked"):
        search_parents(app, settings, "docs", "q")
