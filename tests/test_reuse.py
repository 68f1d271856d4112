"""Pay once per text: identical texts are embedded once per model (issue 16.1).

Counted where the money goes: the local OpenAI-compatible server's requests and inputs.
"""

from __future__ import annotations

import json
import os
import random
import threading
import tomllib
from unittest import mock

import psycopg

from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import (
    Stack,
    assert_column_current,
    docs_config,
    seed,
    wait_for,
    write_config,
)


def _seed_with_duplicates(stack: Stack) -> list[str]:
    """100 rows, 70 distinct texts: 30 rows repeat an earlier text, in shuffled order so
    some twins share a batch and others are already embedded when theirs comes."""
    # Texts of this test alone: the test server is shared by the tests of one process.
    texts = [f"reuse text {i}" for i in range(70)] + [f"reuse text {(i * 7) % 70}"
                                                      for i in range(30)]
    random.Random(16).shuffle(texts)
    seed(stack, rows=[(None, text) for text in texts])
    return texts


def _one_worker(stack: Stack) -> None:
    """One thread: batches run one after another, so a text is bought once exactly
    (concurrent batches holding the same unseen text may each buy it)."""
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=1)


def _status(stack: Stack) -> dict[str, object]:
    result = stack.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return next(s for s in json.loads(result.stdout)["columns"] if s["role"] == "live")


def test_duplicates_embed_exactly_the_distinct_texts(stack: Stack,
                                                     fake_openai: FakeOpenAIServer) -> None:
    texts = _seed_with_duplicates(stack)
    _one_worker(stack)
    result = stack.cli("tick", "--wait", "--timeout", "120")
    assert result.returncode == 0, result.stdout + result.stderr
    counts = fake_openai.stats()["text_counts"]
    bought = {text: counts.get(text, 0) for text in set(texts)}
    assert len(bought) == 70
    assert {text: n for text, n in bought.items() if n != 1} == {}  # each bought once
    assert_column_current(stack, "embedding", "fake-384", 384)
    status = _status(stack)
    assert (status["provider_inputs"], status["reused"]) == (70, 30)
    with stack.connect() as conn:  # the usage ledger: bought and copied apart
        assert conn.execute("SELECT sum(inputs), sum(reused) FROM pgreembed.usage"
                            ).fetchone() == (70, 30)


def test_edit_back_to_a_text_another_row_holds_costs_nothing(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    seed(stack, rows=[(None, "template"), (None, "template"), (None, "other")])
    _one_worker(stack)
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    assert fake_openai.stats()["inputs_embedded"] == 2
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'edited' WHERE id = 1")
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    assert fake_openai.stats()["inputs_embedded"] == 3  # 'edited' is new: bought
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'template' WHERE id = 1")  # back again
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    assert fake_openai.stats()["inputs_embedded"] == 3  # row 2 holds it: copied
    assert_column_current(stack, "embedding", "fake-384", 384)


def test_edit_back_to_a_text_no_row_holds_any_more_is_bought_at_once(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """A -> B -> A within the 30 s a text stays marked bought (text_claims.DONE_SECONDS):
    A's vector was written, then overwritten by B's, so no row holds it to copy. The
    batch used to leave the row pending until the mark expired (the scheduler sent it
    again ~4 times a second for up to 30 s); it buys A again now."""
    seed(stack, rows=[(None, "first")])
    _one_worker(stack)
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'second' WHERE id = 1")
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    with stack.connect() as conn:
        conn.execute("UPDATE docs SET body = 'first' WHERE id = 1")  # back, within 30 s
    result = stack.cli("tick", "--wait", "--timeout", "15")
    assert result.returncode == 0, result.stdout + result.stderr
    assert fake_openai.stats()["text_counts"].get("first") == 2  # nowhere to copy it from
    assert_column_current(stack, "embedding", "fake-384", 384)


def test_dedupe_off_sends_every_row(stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    write_config(stack.config_path, docs_config(target_extra="dedupe = false"))
    _seed_with_duplicates(stack)
    _one_worker(stack)
    assert stack.cli("tick", "--wait", "--timeout", "120").returncode == 0
    assert fake_openai.stats()["inputs_embedded"] == 100
    assert_column_current(stack, "embedding", "fake-384", 384)
    status = _status(stack)
    assert (status["provider_inputs"], status["reused"]) == (100, 0)


def test_a_copied_vector_is_not_written_over_a_text_edited_meanwhile(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """The copy takes the guarded write: edited while the batch waits on the provider
    (for its other row), the row keeps no vector and is redone with its new text."""
    from pgreembed.config import parse_settings
    with mock.patch.dict(os.environ, stack.env):  # importing `worker` builds its broker
        from worker.batch import process_batch

    seed(stack, rows=[(None, "shared")])
    assert stack.cli("init").returncode == 0
    stack.start_worker(threads=1)
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    seed(stack, rows=[(None, "shared"), (None, "HOLD new text")])  # for the test's own batch
    with stack.connect() as conn:
        slot_id = conn.execute("SELECT id FROM pgreembed.slots WHERE role = 'live'"
                               ).fetchone()[0]
    fake_openai.reset()
    fake_openai.set_faults(hold_marker="HOLD")
    settings = parse_settings(tomllib.loads(stack.config_path.read_text()), stack.env)
    reports = []
    batch = threading.Thread(target=lambda: reports.append(
        process_batch(settings, "docs", slot_id, ["2", "3"])))
    batch.start()
    try:
        wait_for(lambda: fake_openai.stats()["requests"] >= 1, message="the held request")
        with psycopg.connect(stack.dsn, autocommit=True) as conn:
            conn.execute("UPDATE docs SET body = 'edited meanwhile' WHERE id = 2")
    finally:
        fake_openai.set_faults(hold_marker=None)
        batch.join(60)
    assert fake_openai.stats()["text_counts"] == {"HOLD new text": 1}  # 'shared': copied
    assert reports and (reports[0].written, reports[0].changed_meanwhile) == (1, 1)
    with stack.connect() as conn:
        assert conn.execute("SELECT embedding IS NULL FROM docs WHERE id = 2"
                            ).fetchone() == (True,)
    assert stack.cli("tick", "--wait", "--timeout", "60").returncode == 0
    assert_column_current(stack, "embedding", "fake-384", 384)
