"""Issue 25, test 6 at a twentieth of the size (5,000 chunks): grouped search's recall@10
of parents against exact search, through an HNSW index, on chunks that crowd (10 close
chunks a parent, 20 parents a topic). `python -m bench.chunk_recall` runs 100k chunks."""

from __future__ import annotations

import json

import pytest

from pgreembed.operations.chunk_search import search_parents
from pgreembed.store.pool import connect
from pgreembed.testing.fake_vectors import fake_vector
from tests.chunk_recall_data import DIMS, MODEL, corpus, load
from tests.helpers import Stack
from tests.test_chunked_targets import chunked_stack, init


@pytest.mark.timeout(300)
def test_grouped_search_recall_at_10_through_hnsw(stack: Stack) -> None:
    settings = chunked_stack(stack)
    init(stack)
    data = corpus(parents=500)
    with stack.connect() as conn:
        load(conn, data)
        conn.execute("SET maintenance_work_mem = '256MB'")
        conn.execute("CREATE INDEX ON docs_chunks USING hnsw (embedding vector_cosine_ops)")
        conn.execute("ANALYZE docs_chunks")
    recalls = []
    with connect(stack.dsn, autocommit=True) as app:
        app.execute("SET enable_seqscan = off")  # the index, as the app gets it at scale
        for query in data.queries:
            hits = search_parents(app, settings, "docs", query, limit=10, index_settings={})
            want = data.exact(fake_vector(MODEL, query, DIMS), 10)
            recalls.append(len({h.key for h in hits} & set(want)) / 10)
            assert len({h.key for h in hits}) == len(hits) == 10
    figures = {"chunks": len(data.keys), "queries": len(recalls),
               "recall_at_10": sum(recalls) / len(recalls), "worst": min(recalls)}
    print(json.dumps(figures))
    assert figures["recall_at_10"] >= 0.95, figures
