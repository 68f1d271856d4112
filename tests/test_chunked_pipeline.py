"""Chunked targets end to end: scheduler (chunk stage) -> Redis -> worker -> chunk table.

The chunk table is embedded by the ordinary machinery; every chunk's vector is checked
against the fake provider's vector of that chunk's text, and every chunk set against the
chunks of its parent's current text.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import pytest

from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from tests.helpers import Stack, json_document, wait_for
from tests.test_chunked_targets import chunk_sets, chunked_stack, expected

MODEL = "fake-384"
PARENTS = 500


def body(rng: random.Random, key: int, version: str) -> str:
    """~2 kB of paragraphs unique to this parent (4-6 chunks at 800/400); the version
    lands in the middle paragraph, as a one-sentence edit would."""
    paragraphs = [" ".join(f"parent {key} paragraph {p} word{rng.randint(0, 99)}"
                           for _ in range(rng.randint(8, 14))) + "." for p in range(6)]
    paragraphs[3] += f" Edited to version {version}."
    return "\n\n".join(paragraphs)


def settled(stack: Stack, target: object) -> bool:
    with stack.connect() as conn:
        pending = conn.execute("SELECT (SELECT count(*) FROM pgreembed.chunk_dirty_docs)"
                               " + (SELECT count(*) FROM docs_chunks WHERE embedding IS NULL)"
                               ).fetchone()
        return pending == (0,) and chunk_sets(conn) == expected(conn, target)


def running_with_parents(stack: Stack, rows: Iterable[tuple[int, str, str]],
                         destination: str = "") -> Any:
    """A chunked docs target initialised, a 4-thread worker and a scheduler running, the
    parents `(id, title, body)` inserted and their chunk sets embedded; the target."""
    target = chunked_stack(stack, batch_size=32, destination=destination).target("docs")
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=4)
    stack.start_scheduler()
    with stack.connect() as conn:
        for row in rows:
            conn.execute("INSERT INTO docs (id, title, body) VALUES (%s, %s, %s)", row)
    wait_for(lambda: settled(stack, target), timeout=120, message="chunk sets embedded")
    return target


@pytest.mark.timeout(300)
def test_parents_edited_twice_while_the_provider_is_slow_end_current(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    settings = chunked_stack(stack, batch_size=32)
    target = settings.target("docs")
    assert stack.cli("init").returncode == 0
    fake_openai.set_faults(slow_model=MODEL, slow_model_latency=1.5)
    stack.start_worker(threads=4)
    stack.start_scheduler()
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (id, title, body) SELECT * FROM unnest(%s::bigint[],"
                     " %s::text[], %s::text[])",
                     (list(range(1, PARENTS + 1)), [f"t{k}" for k in range(1, PARENTS + 1)],
                      [body(random.Random(k), k, "0") for k in range(1, PARENTS + 1)]))

        def chunked_some() -> bool:
            return conn.execute("SELECT count(*) FROM docs_chunks").fetchone()[0] > 0
        wait_for(chunked_some, timeout=60, message="the chunk stage to run")
        for version in ("1", "2"):  # both within the slow window (1.5 s a request)
            for key in range(1, PARENTS + 1):
                conn.execute("UPDATE docs SET body = %s WHERE id = %s",
                             (body(random.Random(key), key, version), key))
            time.sleep(0.3)
    fake_openai.set_faults(slow_model_latency=0.0)
    wait_for(lambda: settled(stack, target), timeout=180, interval=0.5,
             message="every chunk set current and embedded")

    with stack.connect() as conn:
        sets = chunk_sets(conn)
        assert sets == expected(conn, target)
        assert not any("version 0." in c or "version 1." in c
                       for chunks in sets.values() for c in chunks), "stale chunks"
        rows = conn.execute("SELECT chunk, embedding FROM docs_chunks").fetchall()
    for text, vector in rows:
        np.testing.assert_allclose(vector.to_numpy(), fake_vector(MODEL, text, 384),
                                   atol=1e-6, err_msg=f"chunk {text[:40]!r}: other vector")
    stats = fake_openai.stats()
    counts = stats["text_counts"]
    figures = {"parents": PARENTS, "chunks": len(rows), "inputs": stats["inputs_embedded"],
               "distinct_texts_sent": len(counts),
               "max_sends_of_one_text": max(counts.values())}
    print(json.dumps(figures))
    assert {text for text, _ in rows} <= set(counts)
    assert max(counts.values()) == 1, "a chunk text was bought twice"
    # Unchanged chunks were never sent again: the two edits touch one paragraph each.
    assert stats["inputs_embedded"] <= len(rows) + 2 * 2 * PARENTS


def edits_of(text: str) -> list[tuple[str, str, int]]:
    """(name, edited text, most inputs allowed) for the issue's three edits, in order."""
    paragraphs = text.split("\n\n")
    middle = len(paragraphs) // 2
    sentence = list(paragraphs)
    sentence[middle] += " One sentence added here by the edit, in the middle."
    inserted = sentence[:middle] + ["An inserted paragraph " + "of several words " * 20]
    inserted += sentence[middle:]
    deleted = inserted[:middle + 3] + inserted[middle + 4:]
    return [("sentence", "\n\n".join(sentence), 2), ("insert", "\n\n".join(inserted), 3),
            ("delete", "\n\n".join(deleted), 2)]


@pytest.mark.timeout(300)
def test_edits_of_a_long_document_send_only_their_chunks(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """Issue 25's figures through the whole path, counted at the provider: a one-sentence
    edit in the middle of a ~35 kB document sends at most 2 inputs, an inserted paragraph
    at most 3, a deleted one at most 2. Also: 30% shared boilerplate is bought once."""
    from tests.chunk_corpus import long_document

    settings = chunked_stack(stack, batch_size=32)
    target = settings.target("docs")
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=2)
    stack.start_scheduler()
    text = long_document()
    boilerplate = "\n\n".join(f"Shared boilerplate paragraph {i}: " + "legal words " * 60
                              for i in range(7))
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (id, title, body) VALUES (1, 'long', %s)", (text,))
        for key in range(2, 22):  # ~30% of their chunks are the same boilerplate
            own = body(random.Random(key), key, "0") + "\n\n" + body(random.Random(-key),
                                                                    key, "x")
            conn.execute("INSERT INTO docs (id, title, body) VALUES (%s, 'same', %s)",
                         (key, own + "\n\n" + boilerplate))
    wait_for(lambda: settled(stack, target), timeout=120, message="first chunk sets")
    with stack.connect() as conn:
        chunks = conn.execute("SELECT chunk FROM docs_chunks").fetchall()
    distinct = {c for (c,) in chunks}
    shared = sum(1 for (c,) in chunks if "boilerplate" in c)
    sent = fake_openai.stats()["inputs_embedded"]
    figures: dict[str, object] = {"chunks": len(chunks), "distinct": len(distinct),
                                  "shared_chunks": shared, "inputs": sent}
    # Identical chunk texts are bought once, also when their copies straddle batches in
    # flight together (pgreembed.embedding.text_claims).
    assert sent == len(distinct), figures
    assert max(fake_openai.stats()["text_counts"].values()) == 1
    for name, edited, most in edits_of(text):
        before = fake_openai.stats()["inputs_embedded"]
        with stack.connect() as conn:
            conn.execute("UPDATE docs SET body = %s WHERE id = 1", (edited,))
        wait_for(lambda: settled(stack, target), timeout=60, message=f"{name} re-chunked")
        figures[name] = fake_openai.stats()["inputs_embedded"] - before
        assert 1 <= figures[name] <= most, figures  # type: ignore[operator]
    print(json.dumps(figures))
    assert shared >= 0.3 * len(chunks)


@pytest.mark.timeout(180)
def test_cron_tick_chunks_and_embeds_and_doctor_runs(stack: Stack) -> None:
    """A cron-only deployment: `tick --wait` runs the chunk stage and embeds the chunks;
    `doctor` and `migrate plan` run on a chunked target without a traceback."""
    settings = chunked_stack(stack, batch_size=32)
    target = settings.target("docs")
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        for key in range(1, 11):
            conn.execute("INSERT INTO docs (id, title, body) VALUES (%s, 't', %s)",
                         (key, body(random.Random(key), key, "0")))
    stack.start_worker(threads=2)
    out = stack.cli("tick", "--wait", "--timeout", "120")
    assert out.returncode == 0, out.stdout + out.stderr
    assert settled(stack, target)
    doctor = stack.cli("doctor")
    assert doctor.returncode == 0 and "Traceback" not in doctor.stderr, doctor.stdout
    plan = stack.cli("migrate", "plan", "--target", "docs", "--model", "fake-768",
                     "--dimensions", "768", "--json")
    assert plan.returncode == 0, plan.stderr
    with stack.connect() as conn:
        chunks = conn.execute("SELECT count(*) FROM docs_chunks").fetchone()[0]
    assert json_document(plan.stdout)["rows"] == chunks  # a model change counts chunks
