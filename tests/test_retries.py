"""Retry exhaustion goes through Dramatiq's own mechanism (Retries' on_retry_exhausted)."""

from __future__ import annotations

import redis

from pgreembed.queue.claims import InFlight
from pgreembed.testing.fake_openai import FakeOpenAIServer
from tests.helpers import Stack, docs_config, seed, wait_for


def test_a_batch_that_exhausts_its_retries_hands_its_rows_back(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """Provider down for good: after Dramatiq's last retry the rows' claims are released
    (not held for the hour-long lease), and no row is marked failed."""
    stack.config_path.write_text(docs_config(
        worker_extra="provider_retry_seconds = 1\nretry_backoff_seconds = 0.2"))
    seed(stack, rows=[("a", "b"), ("c", "d")])
    assert stack.cli("init").returncode == 0
    fake_openai.set_faults(error_500_count=10**6)
    assert stack.cli("tick").returncode == 0  # claims the rows and enqueues one batch
    claims = InFlight(redis.Redis.from_url(stack.redis_url), 1, 3600)
    assert claims.count() == 2
    stack.start_worker(threads=1)
    wait_for(lambda: "giving up on a batch of 2 rows" in stack.log_text(), timeout=180,
             interval=0.5, message="Dramatiq's retries to be exhausted")
    wait_for(lambda: claims.count() == 0, timeout=10, message="the claims to be released")
    assert "Retries exceeded" in stack.log_text()
    with stack.connect() as conn:
        assert conn.execute("SELECT count(*) FROM docs WHERE embedding IS NULL"
                            ).fetchone() == (2,)
