"""Issue 25, test 7: a corpus with 30% shared boilerplate chunks costs exactly one provider
input per distinct chunk text, with several workers and a slowed provider, so that copies
of one text land in batches in flight together (pgreembed.embedding.text_claims)."""

from __future__ import annotations

import json
import os
import random
import threading
import time
import tomllib
import uuid
from dataclasses import replace
from typing import Any, cast
from unittest import mock

import numpy as np
import pytest
import redis

from pgreembed.embedding.text_claims import TextClaims
from pgreembed.store.slots import Slot
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_vector
from pgreembed.values import Embedded, Row
from tests.helpers import Stack, json_document, seed, wait_for
from tests.test_chunked_pipeline import MODEL, body, settled
from tests.test_chunked_targets import chunked_stack

PARENTS = 40


def boilerplate_corpus() -> list[tuple[int, str]]:
    """(key, body): each parent's own paragraphs plus 7 shared boilerplate paragraphs
    (~30% of the chunks are copies of those)."""
    boilerplate = "\n\n".join(f"Shared boilerplate paragraph {i}: " + "legal words " * 60
                              for i in range(7))
    return [(key, body(random.Random(key), key, "0") + "\n\n" + body(random.Random(-key), key,
                                                                     "x")
             + "\n\n" + boilerplate) for key in range(1, PARENTS + 1)]


@pytest.mark.timeout(240)
def test_shared_chunk_texts_are_bought_exactly_once_across_concurrent_batches(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    # Small batches and 2 processes x 4 threads: a shared text's copies spread over many
    # batches at the provider together (0.4 s a request).
    settings = chunked_stack(stack, batch_size=8)
    target = settings.target("docs")
    assert stack.cli("init").returncode == 0
    fake_openai.set_faults(slow_model=MODEL, slow_model_latency=0.4)
    stack.start_worker(processes=2, threads=4)
    stack.start_scheduler()
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (id, title, body) SELECT * FROM unnest(%s::bigint[],"
                     " %s::text[], %s::text[])",
                     ([k for k, _ in boilerplate_corpus()], ["same"] * PARENTS,
                      [b for _, b in boilerplate_corpus()]))
    wait_for(lambda: settled(stack, target), timeout=180, interval=0.5,
             message="every chunk embedded")
    with stack.connect() as conn:
        rows = conn.execute("SELECT chunk, embedding FROM docs_chunks").fetchall()
    for text, vector in rows:
        np.testing.assert_allclose(vector.to_numpy(), fake_vector(MODEL, text, 384),
                                   atol=1e-6, err_msg=f"chunk {text[:40]!r}: other vector")
    distinct = {text for text, _ in rows}
    shared = sum(1 for text, _ in rows if "boilerplate" in text)
    stats = fake_openai.stats()
    figures = {"chunks": len(rows), "distinct": len(distinct), "shared_chunks": shared,
               "inputs": stats["inputs_embedded"],
               "max_sends_of_one_text": max(stats["text_counts"].values())}
    print(json.dumps(figures))
    assert shared >= 0.3 * len(rows), figures
    assert stats["inputs_embedded"] == len(distinct), figures
    assert max(stats["text_counts"].values()) == 1, figures


def _slot(claim_id: int = 1) -> Slot:
    return Slot(claim_id, cast(Any, None), "embedding", "live", 7, "openai/fake-4/4",
                "openai", "fake-4", 4, "id", "bigint")


def _row(key: int, text: str) -> Row:
    return Row(key, text, uuid.uuid5(uuid.NAMESPACE_OID, text))


def test_a_text_another_batch_is_buying_is_copied_once_published(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    first, second = (TextClaims(client, _slot(), 30.0) for _ in range(2))
    assert first.claim([_row(1, "same")]).mine == [_row(1, "same")]
    claimed = second.claim([_row(2, "same"), _row(3, "other")])
    assert claimed.theirs == [_row(2, "same")] and claimed.mine == [_row(3, "other")]
    first.publish([Embedded(_row(1, "same"), np.arange(4, dtype=np.float32), True)])
    copies, gone = second.wait(claimed.theirs)
    assert gone == [] and [c.row for c in copies] == [_row(2, "same")]
    np.testing.assert_array_equal(copies[0].vector, np.arange(4, dtype=np.float32))
    assert copies[0].truncated
    # A batch that comes later copies it at claim time; another model's slot does not.
    assert [c.row for c in TextClaims(client, _slot(), 30.0).claim([_row(4, "same")]).copied
            ] == [_row(4, "same")]
    other_model = replace(_slot(), model_id=8)
    assert TextClaims(client, other_model, 30.0).claim([_row(5, "same")]).mine == [
        _row(5, "same")]


def test_a_buyer_that_fails_or_dies_does_not_hold_the_others(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    # Failed: it got no vector, its claim is dropped when it is done, and the waiter gives
    # up at once (its row stays pending, not failed), the next batch buys the text.
    with TextClaims(client, _slot(), 30.0) as failing:
        failing.claim([_row(1, "bad luck")])
        waiter = TextClaims(client, _slot(), 30.0)
        theirs = waiter.claim([_row(2, "bad luck")]).theirs
    started = time.monotonic()
    assert waiter.wait(theirs) == ([], [_row(2, "bad luck")])
    assert time.monotonic() - started < 5
    assert TextClaims(client, _slot(), 30.0).claim([_row(3, "bad luck")]).mine
    # Died (never released): its claim expires, the waiter stops waiting then.
    TextClaims(client, _slot(), 1.0).claim([_row(1, "crashed")])
    waiter = TextClaims(client, _slot(), 1.0)
    theirs = waiter.claim([_row(2, "crashed")]).theirs
    assert theirs == [_row(2, "crashed")]
    started = time.monotonic()
    assert waiter.wait(theirs) == ([], [_row(2, "crashed")])
    assert time.monotonic() - started < 5
    assert TextClaims(client, _slot(), 1.0).claim([_row(3, "crashed")]).mine


def test_a_text_bought_lately_is_left_to_postgres_not_bought_again(redis_url: str) -> None:
    """A batch that read its rows before another's write landed finds no vector in
    Postgres; the text is marked done, so it leaves the rows pending (the next batch copies
    the vector from Postgres) instead of buying it again. Nobody waited: no vector is kept
    in Redis."""
    client = redis.Redis.from_url(redis_url)
    with TextClaims(client, _slot(), 30.0) as buyer:
        buyer.claim([_row(1, "boilerplate")])
        buyer.publish([Embedded(_row(1, "boilerplate"), np.ones(4, dtype=np.float32))])
        buyer.landed({1})
    late = TextClaims(client, _slot(), 30.0).claim([_row(2, "boilerplate")])
    assert (late.mine, late.copied, late.theirs, late.later) == ([], [], [], [
        _row(2, "boilerplate")])
    assert not any(client.get(k).startswith(b"V") for k in client.keys("pgreembed:text:*")
                   if not k.endswith(b":w"))
    # Bought but not written (edited meanwhile, held by the app): not done, dropped; the
    # next batch buys it (its vector is not in Postgres to copy).
    with TextClaims(client, _slot(), 30.0) as buyer:
        buyer.claim([_row(1, "unwritten")])
        buyer.publish([Embedded(_row(1, "unwritten"), np.ones(4, dtype=np.float32))])
        buyer.landed(set())
    assert TextClaims(client, _slot(), 30.0).claim([_row(2, "unwritten")]).mine


def test_a_batch_waits_for_the_buyer_and_a_failed_buyer_fails_only_its_rows(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """Two batches with one text, in one worker process: the second waits for the first's
    vector (one provider input); when the first buyer's row fails (a 400 for that input),
    the waiting batch leaves its row pending, not failed."""
    from pgreembed.config import parse_settings
    with mock.patch.dict(os.environ, stack.env):  # importing `worker` builds its broker
        from worker.batch import process_batch

    seed(stack, rows=[(None, "HOLD shared"), (None, "HOLD shared"), (None, "HOLD BAD"),
                      (None, "HOLD BAD")])
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        slot_id = conn.execute("SELECT id FROM pgreembed.slots WHERE role = 'live'"
                               ).fetchone()[0]
    settings = parse_settings(tomllib.loads(stack.config_path.read_text()), stack.env)
    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    fake_openai.reset()
    fake_openai.set_faults(hold_marker="HOLD", bad_input_marker="BAD")
    reports: dict[str, Any] = {}

    def run(key: str) -> None:
        reports[key] = process_batch(settings, "docs", slot_id, [key])

    def flagged() -> bool:
        return bool(client.keys("pgreembed:text:*:w"))
    for first, second in (("1", "2"), ("3", "4")):
        buyer = threading.Thread(target=run, args=(first,))
        buyer.start()
        wait_for(lambda: bool(client.keys("pgreembed:text:*")), message="the buyer's claim")
        waiter = threading.Thread(target=run, args=(second,))
        waiter.start()
        wait_for(flagged, message="the second batch waiting on the text")
        fake_openai.set_faults(hold_marker=None)
        buyer.join(60)
        waiter.join(60)
        fake_openai.set_faults(hold_marker="HOLD")
        client.delete(*client.keys("pgreembed:text:*"))
        if first == "1":
            assert (reports["1"].written, reports["2"].written, reports["2"].reused) == (
                1, 1, 1), reports
        else:
            assert (reports["3"].failed, reports["4"].failed, reports["4"].written) == (
                1, 0, 0), reports
    assert fake_openai.stats()["text_counts"]["HOLD shared"] == 1
    with stack.connect() as conn:
        vectors = dict(conn.execute("SELECT id, embedding IS NOT NULL FROM docs").fetchall())
    assert vectors == {1: True, 2: True, 3: False, 4: False}
    out = stack.cli("failures", "--target", "docs", "--json")
    assert [str(f["key"]) for f in json_document(out.stdout)["failures"]] == ["3"]


def test_a_killed_buyers_claim_is_dropped_when_its_alive_key_is_gone(redis_url: str) -> None:
    """A worker killed while buying never settles its claims: the waiter (its own
    redelivered batch, say) sees the buyer's alive key gone and leaves at once, not after
    claim_seconds (90 s by default: the chaos tests waited that long per kill)."""
    client = redis.Redis.from_url(redis_url)
    killed = TextClaims(client, _slot(), 90.0)
    killed.claim([_row(1, "killed mid-call")])
    assert client.exists(f"pgreembed:text-buyer:{killed.token.decode()}")
    killed._alive_stop.set()  # the process died: nothing refreshes its key any more
    client.delete(f"pgreembed:text-buyer:{killed.token.decode()}")  # ...and it expired
    waiter = TextClaims(client, _slot(), 90.0)
    theirs = waiter.claim([_row(1, "killed mid-call")]).theirs
    assert theirs == [_row(1, "killed mid-call")]
    started = time.monotonic()
    assert waiter.wait(theirs) == ([], [_row(1, "killed mid-call")])
    assert time.monotonic() - started < 5
    assert TextClaims(client, _slot(), 90.0).claim([_row(2, "killed mid-call")]).mine
    # A live buyer's claim is waited on (its key is refreshed while it runs).
    with TextClaims(client, _slot(), 90.0) as alive:
        alive.claim([_row(3, "still buying")])
        other = TextClaims(client, _slot(), 0.5)
        assert other.wait(other.claim([_row(4, "still buying")]).theirs)[1] == [
            _row(4, "still buying")]  # gave up only at its own 0.5 s claim_seconds
        assert client.exists(f"pgreembed:text-buyer:{alive.token.decode()}")
