"""The chunk stage runs in the workers: the scheduler only finds dirty parents and sends
them (claimed in Redis, never twice at once); a worker killed while splitting and applying
loses nothing (the marks stay in Postgres until applied)."""

from __future__ import annotations

import os
import random
import signal

import pytest
import redis

from pgreembed.queue.claims import chunk_claims
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import Stack, wait_for
from tests.test_chunked_pipeline import body, settled
from tests.test_chunked_targets import chunked_stack, dirty

PARENTS = 300


@pytest.mark.timeout(240)
def test_the_scheduler_sends_dirty_parents_and_a_killed_worker_loses_none(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    settings = chunked_stack(stack, batch_size=32)
    target = settings.target("docs")
    assert stack.cli("init").returncode == 0
    stack.start_scheduler()  # no worker yet: the parents can only wait, claimed
    keys = list(range(1, PARENTS + 1))
    with stack.connect() as conn:
        conn.execute("INSERT INTO docs (id, title, body) SELECT * FROM unnest(%s::bigint[],"
                     " %s::text[], %s::text[])",
                     (keys, [f"t{k}" for k in keys], [body(random.Random(k), k, "0")
                                                      for k in keys]))
        claims = chunk_claims(redis.Redis.from_url(stack.redis_url), "docs",
                              settings.lease_seconds)
        wait_for(lambda: claims.count() == PARENTS, timeout=60,
                 message="the scheduler to claim and send every dirty parent")
        # Sent, not split: the scheduler wrote no chunk and removed no mark.
        assert conn.execute("SELECT count(*) FROM docs_chunks").fetchone() == (0,)
        assert dirty(conn) == set(keys)
        assert claims.count() == PARENTS  # passes go on; nothing is sent twice meanwhile

        worker = stack.start_worker(threads=4)

        def midway() -> bool:
            done = conn.execute("SELECT count(DISTINCT id) FROM docs_chunks").fetchone()[0]
            return done > 0 and len(dirty(conn)) > 0
        wait_for(midway, timeout=60, interval=0.02, message="the workers to be chunking")
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)
        left = dirty(conn)
        assert left, "the kill came too late to prove anything"
        chunked = {r[0] for r in conn.execute("SELECT DISTINCT id FROM docs_chunks")}
        assert not left & chunked, "a parent lost its mark before its chunks were applied"
        assert left | chunked == set(keys), "a parent neither chunked nor marked"

    stack.start_worker(threads=4)  # Dramatiq redelivers the killed worker's batches
    wait_for(lambda: settled(stack, target), timeout=150, interval=0.5,
             message="every parent chunked and embedded after the kill")
    wait_for(lambda: claims.count() == 0, timeout=30, message="every claim released")
