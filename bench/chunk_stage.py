"""Re-chunk after an edit: pgreembed's matching stage against replacing every chunk.

The peers (pgai, pgEdge) delete every chunk of an edited row and insert (and embed) them
all again. This bench edits one sentence in the middle of N ~35 kB documents and runs
the chunk stage's apply with each strategy on the same data, rounds interleaved: the
chunk rows written, the new texts left to embed (provider inputs), and the wall time of
the stage. The same code path serves both; only the match differs.

    PYTHONPATH=$PWD .venv/bin/python -m bench.chunk_stage --parents 100 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from pgreembed.chunking.matching import Diff, Existing, match
from pgreembed.chunking.splitter import chunker
from pgreembed.config import parse_settings
from pgreembed.store.chunk_sets import apply_chunk_sets, enter_as_writer, read_dirty
from pgreembed.store.chunks import parent_key
from pgreembed.store.pool import connect
from pgreembed.store.setup import init_target
from pgreembed.store.slots import load_slots
from pgreembed.testing.services import EmbeddedPostgres

Match = Callable[[list[Existing], list[str]], Diff]


def replace_all(existing: list[Existing], new: list[str]) -> Diff:
    """The peers' re-chunk: every old chunk deleted, every new one inserted."""
    return Diff(delete=[e.uuid for e in existing], insert=list(enumerate(new)))


def document(key: int) -> list[str]:
    from tests.chunk_corpus import long_document

    return long_document(seed=key).split("\n\n")


def edited(paragraphs: list[str], version: int) -> str:
    out = list(paragraphs)
    middle = len(out) // 2
    out[middle] += f" One sentence of edit number {version} in the middle of the document."
    return "\n\n".join(out)


def stage(dsn: str, target: Any, strategy: Match) -> dict[str, float]:
    """Re-chunk every dirty parent with `strategy`: seconds, rows written, new texts."""
    chunks_of = chunker(target.parent.chunking, target.provider, target.model)
    written = inserted = 0
    started = time.perf_counter()
    with connect(dsn) as conn:
        vector = load_slots(conn, target)[0].vector
        key = parent_key(conn, target)
        while parents := read_dirty(conn, target, key, 100):
            conn.commit()
            planned = [(p, chunks_of(p.text or "", p.row)) for p in parents]
            assert enter_as_writer(conn, target), "no swap runs in this bench"
            applied = apply_chunk_sets(conn, target, key, vector, planned, strategy)
            conn.commit()
            written += applied.inserted + applied.deleted + applied.moved
            inserted += applied.inserted
    return {"seconds": time.perf_counter() - started, "rows_written": written,
            "texts_to_embed": inserted}


def measure(dsn: str, parents: int, rounds: int) -> dict[str, Any]:
    settings = parse_settings({"target": [{
        "name": "docs", "table": "docs", "text_column": "body", "vector_column": "embedding",
        "provider": "openai", "model": "text-embedding-3-small", "dimensions": 1536,
        "chunking": {}}]}, {"DATABASE_URL": dsn})
    target = settings.target("docs")
    with connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id bigint PRIMARY KEY, body text)")
        texts = {k: document(k) for k in range(1, parents + 1)}
        conn.execute("INSERT INTO docs SELECT * FROM unnest(%s::bigint[], %s::text[])",
                     (list(texts), ["\n\n".join(t) for t in texts.values()]))
    init_target(dsn, target)
    first = stage(dsn, target, match)
    results: dict[str, list[dict[str, float]]] = {"matching": [], "replace_all": []}
    version = 0
    for _ in range(rounds):
        for name, strategy in (("matching", match), ("replace_all", replace_all)):
            version += 1
            with connect(dsn, autocommit=True) as conn:
                conn.execute("UPDATE docs SET body = v.body FROM unnest(%s::bigint[],"
                             " %s::text[]) AS v(id, body) WHERE docs.id = v.id",
                             (list(texts), [edited(t, version) for t in texts.values()]))
            results[name].append(stage(dsn, target, strategy))
    with connect(dsn) as conn:
        chunks = conn.execute("SELECT count(*) FROM docs_chunks").fetchone()
    return {"first": first, "chunks": chunks[0] if chunks else 0,
            "by_strategy": {name: {field: statistics.median(r[field] for r in runs)
                                   for field in runs[0]} for name, runs in results.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--parents", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgreembed-chunk-stage-") as folder:
        server = EmbeddedPostgres(f"{folder}/pg")
        try:
            result = measure(server.start(), args.parents, args.rounds)
        finally:
            server.stop()
    ours, theirs = result["by_strategy"]["matching"], result["by_strategy"]["replace_all"]
    print(f"{args.parents} parents, {result['chunks']} chunks; first chunking"
          f" {result['first']['seconds']:.2f} s")
    for name, figures in result["by_strategy"].items():
        print(f"{name}: {figures['seconds']:.2f} s, {figures['rows_written']:.0f} rows"
              f" written, {figures['texts_to_embed']:.0f} texts to embed")
    print(f"ratio replace_all/matching: texts to embed"
          f" {theirs['texts_to_embed'] / max(ours['texts_to_embed'], 1):.1f}x, rows written"
          f" {theirs['rows_written'] / max(ours['rows_written'], 1):.1f}x, stage time"
          f" {theirs['seconds'] / ours['seconds']:.2f}x (median of {args.rounds})")
    print("result: " + json.dumps({"parents": args.parents, "rounds": args.rounds, **result}))


if __name__ == "__main__":
    main()
