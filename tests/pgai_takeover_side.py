"""Shared scenery of the take-over tests and bench: a docs table filled by pgai 0.12.1's own
worker (through the fake OpenAI server), adopted as a chunked target, and the checks
(chunk sets against the current texts, vectors against the model's vectors of each text).
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from pgreembed.chunking.splitter import chunker
from pgreembed.config import Settings, load_settings
from pgreembed.store.chunk_sets import chunk_uuid
from pgreembed.testing import pgai_side
from pgreembed.testing.fake_vectors import fake_vector

MODEL = "text-embedding-3-small"
DIMS = 64
VECTORIZER = "docs_v"  # also the target's name, as import-pgai maps it
CHUNKS = "docs_v_store"
DIRTY = "pgreembed.chunk_dirty_docs_v"
FAILED = "pgreembed.chunk_failed_docs_v"

TOML = pgai_side.adopted_target_toml(VECTORIZER, MODEL, DIMS, CHUNKS, view=VECTORIZER) + """
[worker]
poll_interval = 0.5
max_inflight_rows = 1024
"""


def body(key: int, version: str) -> str:
    """~2 kB of paragraphs unique to this parent (4-6 chunks at 800/400); the version lands
    in the middle paragraph, as a one-sentence edit would."""
    rng = random.Random(key)
    paragraphs = [" ".join(f"parent {key} paragraph {p} word{rng.randint(0, 99)}"
                           for _ in range(rng.randint(8, 14))) + "." for p in range(6)]
    paragraphs[3] += f" Edited to version {version}."
    return "\n\n".join(paragraphs)


def insert(conn: psycopg.Connection, keys: range | list[int], version: str) -> None:
    conn.execute("INSERT INTO docs (id, title, body) SELECT * FROM unnest(%s::bigint[],"
                 " %s::text[], %s::text[])", (list(keys), [f"t{k}" for k in keys],
                                               [body(k, version) for k in keys]))


def edit(conn: psycopg.Connection, keys: range | list[int], version: str) -> None:
    conn.execute("UPDATE docs d SET body = u.b FROM unnest(%s::bigint[], %s::text[])"
                 " AS u(k, b) WHERE d.id = u.k", (list(keys), [body(k, version) for k in keys]))


def settings_for(config: Path, env: dict[str, str], batch_size: int = 64) -> Settings:
    config.write_text(TOML.format(batch_size=batch_size))
    return load_settings(config, env)


def pgai_filled(dsn: str, base_url: str, api_key: str, parents: int,
                batch_size: int | None = None) -> pgai_side.VectorizerRow:
    """pgai installed, its vectorizer on docs.body (recursive 800/400, $chunk), `parents`
    rows embedded by pgai's own worker."""
    pgai_side.install_pgai(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        insert(conn, range(1, parents + 1), "0")
        pgai_side.create_vectorizer(conn, pgai_side.VectorizerSpec(
            source="public.docs", name=VECTORIZER, model=MODEL, dimensions=DIMS,
            base_url=base_url, batch_size=batch_size))
    pgai_side.run_pgai_worker_once(dsn, api_key)
    with psycopg.connect(dsn, autocommit=True) as conn:
        return pgai_side.vectorizer_row(conn, VECTORIZER)


def import_pgai(env: dict[str, str], *args: str, cwd: Path | None = None
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pgreembed", "import-pgai", *args],
                          env=env, capture_output=True, text=True, timeout=300, cwd=cwd)


def adopt(env: dict[str, str]) -> None:
    """`import-pgai --vectorizer docs_v --adopt --no-embed-check`: the chunk table registered as the
    target's live column, pgai still in charge."""
    done = import_pgai(env, "--vectorizer", VECTORIZER, "--adopt", "--no-embed-check")
    assert done.returncode == 0, done.stdout + done.stderr


def _keys(key: tuple[str, ...]) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c) for c in key)


def _key(key: tuple[str, ...], row: tuple[Any, ...]) -> Any:
    """A parent's key: the value, or a tuple for a key of several columns."""
    return row[0] if len(key) == 1 else tuple(row[:len(key)])


def chunk_sets(conn: psycopg.Connection, key: tuple[str, ...] = ("id",)
               ) -> dict[Any, list[str]]:
    sets: dict[Any, list[str]] = {}
    for row in conn.execute(sql.SQL("SELECT {k}, chunk_seq, chunk FROM {t}"
                                    " ORDER BY {k}, chunk_seq").format(
            k=_keys(key), t=sql.Identifier(CHUNKS))):
        parent, seq, text = _key(key, row), row[-2], row[-1]
        assert seq == len(sets.setdefault(parent, [])), f"parent {parent}: chunk_seq not 0.."
        sets[parent].append(text)
    return sets


def expected(conn: psycopg.Connection, settings: Settings, key: tuple[str, ...] = ("id",)
             ) -> dict[Any, list[str]]:
    target = settings.target(VECTORIZER)
    split = chunker(target.parent.chunking, target.provider, target.model)
    wanted = {_key(key, row): split(row[-1] or "", {}) for row in conn.execute(
        sql.SQL("SELECT {}, body FROM docs").format(_keys(key)))}
    return {k: v for k, v in wanted.items() if v}


def pending(conn: psycopg.Connection) -> int:
    row = conn.execute(sql.SQL(
        "SELECT (SELECT count(*) FROM {})"
        " + (SELECT count(*) FROM {} WHERE embedding IS NULL)").format(
        sql.Identifier(*DIRTY.split(".")), sql.Identifier(CHUNKS))).fetchone()
    return int(row[0]) if row else -1


def settled(conn: psycopg.Connection, settings: Settings, key: tuple[str, ...] = ("id",)
            ) -> bool:
    return pending(conn) == 0 and chunk_sets(conn, key) == expected(conn, settings, key)


def wrong_vectors(conn: psycopg.Connection) -> list[str]:
    """Chunks whose vector is not the model's vector of their text (NULL counts)."""
    wrong = []
    for text, vector in conn.execute(sql.SQL("SELECT chunk, embedding FROM {}").format(
            sql.Identifier(CHUNKS))):
        if vector is None or not np.allclose(vector.to_numpy(), fake_vector(MODEL, text, DIMS),
                                             atol=1e-5):
            wrong.append(text[:60])
    return wrong


def made_by_pgai(conn: psycopg.Connection, among: set[Any] | None = None) -> int:
    """Chunk rows whose key is not one pgreembed makes (8 bytes of md5(chunk), then
    random): pgai's keys are gen_random_uuid(). `among`: only rows not in this set."""
    count = 0
    for key, text in conn.execute(sql.SQL("SELECT embedding_uuid, chunk FROM {}").format(
            sql.Identifier(CHUNKS))):
        if among is not None and key in among:
            continue
        if key.bytes[:8] != chunk_uuid(text).bytes[:8]:
            count += 1
    return count


def pgai_rows_written(conn: psycopg.Connection) -> int:
    """pgai's own count of source rows its workers have processed (worker tracking)."""
    row = conn.execute("SELECT coalesce(sum(success_count), 0)"
                       " FROM ai.vectorizer_worker_progress").fetchone()
    return int(row[0]) if row else 0


def pgai_in_flight(conn: psycopg.Connection) -> int:
    """pgai worker sessions inside a batch's transaction (at the provider, or writing)."""
    row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE"
                       " 'pgai-worker%' AND xact_start IS NOT NULL").fetchone()
    return int(row[0]) if row else 0
