"""Chunk vectors with the structure real ones have, for grouped-search recall (issue 25,
test 6): parents about topics, each parent's chunks close to each other (so the nearest
chunks crowd into few parents), queries about a topic. Shared by the test and
bench/chunk_recall.py.

The fake provider's vectors are hashes (every text a random direction: no neighbourhood
to recall), so the chunk vectors are written here, and a query's topic centre is the
fake provider's vector of the query text: search_parents embeds the query through the
real path and the answer is measured against exact search over the same vectors.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import psycopg

from pgreembed.testing.fake_vectors import fake_vectors

MODEL, DIMS = "fake-384", 384
PARENT_SPREAD = 0.07  # per-dimension noise of a parent's centre around its topic
CHUNK_SPREAD = 0.04  # per-dimension noise of a chunk around its parent's centre


@dataclass
class Corpus:
    parents: int
    chunks_per_parent: int
    queries: list[str]
    keys: npt.NDArray[np.int64]  # the parent of each chunk
    vectors: npt.NDArray[np.float32]  # unit rows, one per chunk

    def exact(self, query_vector: npt.NDArray[np.float32], limit: int) -> list[int]:
        """The `limit` parents nearest by their nearest chunk (cosine), by brute force."""
        distance = 1.0 - self.vectors @ (query_vector / np.linalg.norm(query_vector))
        best = np.full(self.parents + 1, np.inf)
        np.minimum.at(best, self.keys, distance)
        return [int(k) for k in np.argsort(best)[:limit]]


def _unit(rows: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def corpus(parents: int, chunks_per_parent: int = 10, topics: int | None = None,
           seed: int = 6) -> Corpus:
    """`parents` x `chunks_per_parent` chunks over `topics` topics (default: 20 parents a
    topic); one query per topic, whose vector (the fake provider's) is the topic's centre."""
    topics = topics or max(1, parents // 20)
    rng = np.random.default_rng(seed)
    queries = [f"what about topic {t}?" for t in range(topics)]
    centres = fake_vectors(MODEL, queries, DIMS)
    topic_of = rng.integers(0, topics, parents)
    parent_centres = _unit(centres[topic_of]
                           + PARENT_SPREAD * rng.standard_normal((parents, DIMS)))
    keys = np.repeat(np.arange(1, parents + 1), chunks_per_parent)
    vectors = _unit(parent_centres[keys - 1]
                    + CHUNK_SPREAD * rng.standard_normal((len(keys), DIMS)))
    return Corpus(parents, chunks_per_parent, queries, keys, vectors)


def load(conn: psycopg.Connection, data: Corpus) -> None:
    """The parents (docs) and their chunks, vectors included, by binary COPY (the chunk
    stage is not what is measured); the caller commits."""
    conn.execute("INSERT INTO docs (id, title, body) SELECT g, 't', 'parent ' || g"
                 " FROM generate_series(1, %s) g", (data.parents,))
    with conn.cursor() as cur, cur.copy(
            "COPY docs_chunks (embedding_uuid, id, chunk_seq, chunk, embedding)"
            " FROM STDIN WITH (FORMAT BINARY)") as copy:
        copy.set_types(["uuid", "int8", "int4", "text", "vector"])
        for i, (key, vector) in enumerate(zip(data.keys, data.vectors, strict=True)):
            seq = i % data.chunks_per_parent
            copy.write_row((uuid.uuid4(), int(key), seq, f"chunk {seq} of {key}", vector))
    # Parents inserted here need no chunking: their chunks are these.
    conn.execute("DELETE FROM pgreembed.chunk_dirty_docs")
