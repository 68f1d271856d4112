"""The Redis-shared rate limit: never over budget across threads and processes,
adaptive back-off after a 429, and no 429 storm from a real worker fleet.

Budgets here use a short window so the tests measure several windows in
seconds; providers (and the fake server) use 60 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import psycopg
import pytest
import redis

from pgreembed.embedding.providers.openai_provider import OpenAIProvider
from pgreembed.embedding.ratelimit import RateLimiter, limiter_client
from pgreembed.errors import FatalProviderError
from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_token_count, fake_vector
from tests.helpers import API_KEY, ROOT, Stack, docs_config, seed, start_migration, wait_for

WINDOW = 2.0
RPM = 8  # per WINDOW here
TPM = 400
TOKEN_CYCLE = [10, 50, 90, 30]

# One process of the fleet: THREADS threads, each sends REQUESTS requests; prints
# [(sent at, tokens), ...] measured right after the limiter let each one go.
CLIENT = """
import json, sys, threading, time, redis
from pgreembed.embedding.ratelimit import RateLimiter
url, name, threads, requests, offset, rpm, tpm = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:8])
cycle, window = json.loads(sys.argv[8]), float(sys.argv[9])
limiter = RateLimiter(redis.Redis.from_url(url), name, requests_per_minute=rpm,
                      tokens_per_minute=tpm, window_seconds=window)
sent, lock = [], threading.Lock()
def run(n):
    for i in range(requests):
        tokens = cycle[(offset + n + i) % len(cycle)]
        limiter.acquire(tokens)
        with lock:
            sent.append((time.time(), tokens))
workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
print(json.dumps(sent))
"""


def worst_window(sent: list[tuple[float, int]], length: float) -> tuple[int, int]:
    """The most requests and tokens sent within any `length` seconds."""
    sent = sorted(sent)
    most_requests = most_tokens = 0
    for i, (start, _) in enumerate(sent):
        inside = [tokens for at, tokens in sent[i:] if at < start + length]
        most_requests = max(most_requests, len(inside))
        most_tokens = max(most_tokens, sum(inside))
    return most_requests, most_tokens


def test_processes_and_threads_sharing_a_limit_never_exceed_it(redis_url: str) -> None:
    processes, threads, requests = 3, 3, 4
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    fleet = [subprocess.Popen([sys.executable, "-c", CLIENT, redis_url, "shared", str(threads),
                               str(requests), str(p), str(RPM), str(TPM),
                               json.dumps(TOKEN_CYCLE), str(WINDOW)],
                              env=env, stdout=subprocess.PIPE, text=True)
             for p in range(processes)]
    sent: list[tuple[float, int]] = []
    for process in fleet:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        sent.extend((at, tokens) for at, tokens in json.loads(out))
    elapsed = time.monotonic() - start
    assert len(sent) == processes * threads * requests
    # Sends are measured after each sleep, so allow a little scheduling jitter.
    most_requests, most_tokens = worst_window(sent, WINDOW - 0.3)
    assert most_requests <= RPM, sent
    assert most_tokens <= TPM, sent
    # ... and the limit is not needlessly strict: 36 requests, 1620 tokens need
    # at least 4 windows beyond the first; allow start-up time on a busy machine.
    total_tokens = sum(t for _, t in sent)
    windows_needed = max(len(sent) / RPM, total_tokens / TPM)
    assert elapsed < (windows_needed + 2.5) * WINDOW, elapsed


def test_429_report_lowers_the_shared_budget_then_it_recovers(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    options = dict(requests_per_minute=10, window_seconds=WINDOW, hold_seconds=1.0,
                   recover_per_second=0.5, cooldown_seconds=0.5)
    here = RateLimiter(client, "adaptive", **options)  # type: ignore[arg-type]
    elsewhere = RateLimiter(redis.Redis.from_url(redis_url), "adaptive",
                            **options)  # type: ignore[arg-type]
    assert here.factor() == 1.0
    assert elsewhere.report_rate_limited() == 0.5
    assert elsewhere.report_rate_limited() == 0.5  # the same burst counts once
    assert here.factor() == 0.5  # shared through Redis
    waits = [here.reserve(1) for _ in range(6)]
    assert waits[:5] == [0.0] * 5, waits  # half of 10 per window
    assert waits[5] > WINDOW - 0.3, waits
    time.sleep(0.6)  # the limiter's own clock: past the cool-down
    assert here.report_rate_limited() == 0.25  # a new burst after the cool-down
    time.sleep(1.2)  # past the hold: additive increase
    assert 0.25 < here.factor() < 1.0
    time.sleep(1.6)  # recovered in full at 0.5 a second
    assert here.factor() == 1.0
    # Another model's budget is untouched.
    assert RateLimiter(client, "other", requests_per_minute=10).factor() == 1.0


def test_limiter_lets_requests_through_when_redis_is_down() -> None:
    from pgreembed.testing.services import free_port

    client = limiter_client(f"redis://127.0.0.1:{free_port()}/0")
    limiter = RateLimiter(client, "down", requests_per_minute=1)
    start = time.monotonic()
    assert [limiter.acquire(10) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.report_rate_limited() == 1.0
    assert time.monotonic() - start < 2


def test_provider_waits_for_budget_and_reports_429s(redis_url: str,
                                                    fake_openai: FakeOpenAIServer) -> None:
    limiter = RateLimiter(redis.Redis.from_url(redis_url), "fake-384", requests_per_minute=2,
                          window_seconds=WINDOW, cooldown_seconds=0.0)
    provider = OpenAIProvider("fake-384", 384, api_key=API_KEY, base_url=fake_openai.base_url,
                              limiter=limiter)
    start = time.monotonic()
    for i in range(3):
        vectors, billed = provider.embed([f"text {i}"])
        assert billed == fake_token_count(f"text {i}")  # the server's `usage`, not our count
        np.testing.assert_allclose(vectors[0], fake_vector("fake-384", f"text {i}", 384),
                                   atol=1e-6)
    assert time.monotonic() - start >= WINDOW - 0.1  # the third request waited for room
    fake_openai.set_faults(rate_limit_count=1, rate_limit_retry_after=0.1)
    provider.embed(["after a 429"])
    assert limiter.factor() == 0.5
    fake_openai.set_faults(quota_count=1)
    with pytest.raises(FatalProviderError):
        provider.embed(["no quota"])
    assert limiter.factor() == 0.5  # insufficient_quota is not a rate problem


# -- a real worker against the fake server's tokens-per-minute limit --------------

ROWS = 800
SERVER_TPM_ROWS = 400  # the server admits 400 rows' tokens per minute
TEXT_BYTES = 64  # the fake server counts 16 tokens; offline we count 64 (UTF-8 bytes)


def test_worker_fleet_stays_under_server_token_limit(stack: Stack,
                                                     fake_openai: FakeOpenAIServer) -> None:
    """Our budget is 90% of the server's: it is reached with no 429 at all."""
    texts = [f"r{i:05d}\n" + f"body of row {i:05d} ".ljust(TEXT_BYTES - 7, ".")
             for i in range(ROWS)]
    assert {len(t.encode()) for t in texts} == {TEXT_BYTES}
    server_tpm = SERVER_TPM_ROWS * fake_token_count(texts[0])
    provider = OpenAIProvider("fake-384", 384, api_key=API_KEY, base_url=fake_openai.base_url)
    ours_per_theirs = provider.count_tokens(texts[:1])[0] / fake_token_count(texts[0])
    our_tpm = int(0.9 * server_tpm * ours_per_theirs)
    budget_rows = int(0.9 * SERVER_TPM_ROWS)
    stack.config_path.write_text(docs_config(batch_size=20, max_inflight_rows=2048,
                                             target_extra=f"tokens_per_minute = {our_tpm}"))

    seed(stack, rows=[(title, body) for title, body in (t.split("\n", 1) for t in texts)])
    assert stack.cli("init").returncode == 0
    fake_openai.set_faults(tokens_per_minute=server_tpm)
    worker = stack.start_worker(processes=2, threads=4)
    try:
        assert stack.cli("tick").returncode == 0
        wait_for(lambda: fake_openai.stats()["inputs_embedded"] >= budget_rows, timeout=40,
                 message="the first minute's budget to be used")
        time.sleep(3)  # the scenario: every worker waits for the window to slide, buying nothing
        stats = fake_openai.stats()

        def written() -> int:
            with stack.connect() as conn:
                return int(conn.execute("SELECT count(embedding) FROM docs").fetchone()[0])

        # What was bought is written before the workers go (a loaded machine may take
        # a while to commit the last batch).
        wait_for(lambda: written() >= stats["inputs_embedded"], timeout=30,
                 message="the rows bought in the first minute to be written")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # threads sleep up to a minute for budget
        worker.wait(10)
    print(f"\nrate limit: {stats['inputs_embedded']} rows in the first minute"
          f" (our budget {budget_rows}, server {SERVER_TPM_ROWS}),"
          f" statuses {stats['status_counts']}")
    assert stats["status_counts"].get("429", 0) == 0, stats["status_counts"]
    assert stats["inputs_embedded"] == budget_rows  # the budget is used, not exceeded
    with stack.connect() as conn:
        written = conn.execute("SELECT concat_ws(E'\\n', title, body), embedding FROM docs"
                               " WHERE embedding IS NOT NULL").fetchall()
    assert len(written) == budget_rows
    for text, vector in written:
        np.testing.assert_allclose(vector.to_numpy(), fake_vector("fake-384", text, 384),
                                   atol=1e-6)


def migration_done(stack: Stack) -> int:
    """Rows the open migration's new column holds (`migrate status --json`'s `done`)."""
    status = stack.cli("migrate", "status", "--target", "docs", "--json")
    return int(json.loads(status.stdout)["done"])


def test_migration_to_a_limited_model_is_throttled_by_that_models_budget(
        stack: Stack, fake_openai: FakeOpenAIServer) -> None:
    """The account limits the NEW model only; `migrate start --tokens-per-minute` records
    its budget, and a real scheduler and worker fleet fill it without a 429 storm."""
    rows, server_rows = 400, 200  # the server admits 200 rows' tokens of fake-768 per minute
    texts = [f"r{i:05d}\n" + f"body of row {i:05d} ".ljust(TEXT_BYTES - 7, ".")
             for i in range(rows)]
    server_tpm = server_rows * fake_token_count(texts[0])
    provider = OpenAIProvider("fake-768", 768, api_key=API_KEY, base_url=fake_openai.base_url)
    ours_per_theirs = provider.count_tokens(texts[:1])[0] / fake_token_count(texts[0])
    our_tpm = int(0.9 * server_tpm * ours_per_theirs)
    budget_rows = int(0.9 * server_rows)
    stack.config_path.write_text(docs_config(batch_size=20, max_inflight_rows=2048))
    seed(stack, rows=[(title, body) for title, body in (t.split("\n", 1) for t in texts)])
    assert stack.cli("init").returncode == 0
    worker = stack.start_worker(processes=2, threads=4)
    stack.start_scheduler()
    wait_for(lambda: fake_openai.stats()["inputs_embedded"] >= rows, timeout=60,
             message="the live column (fake-384, not limited) to be filled")
    fake_openai.reset()
    fake_openai.set_faults(model_limits={"fake-768": {"tokens_per_minute": server_tpm}})
    try:
        start_migration(stack, "--model", "fake-768", "--dimensions", "768",
                        "--tokens-per-minute", str(our_tpm))
        wait_for(lambda: fake_openai.stats()["inputs_embedded"] >= budget_rows, timeout=40,
                 message="the new model's first minute of budget to be used")
        time.sleep(3)  # the scenario: every worker waits for the window to slide (or storms)
        stats = fake_openai.stats()
        # What was bought is written before the workers go (a loaded machine may take
        # a while to commit the last batch).
        wait_for(lambda: migration_done(stack) >= stats["inputs_embedded"], timeout=30,
                 message="the rows bought in the first minute to be written")
    finally:
        os.killpg(worker.pid, signal.SIGKILL)  # threads sleep up to a minute for budget
        worker.wait(10)
    print(f"\nmigration rate limit: {stats['inputs_embedded']} rows of fake-768 in the first"
          f" minute (budget {budget_rows}, server {server_rows}),"
          f" statuses {stats['status_counts']}")
    assert stats["status_counts"].get("429", 0) <= 3, stats["status_counts"]
    assert stats["inputs_embedded"] == budget_rows  # the budget is used, not exceeded
    assert migration_done(stack) == budget_rows


def test_budgets_are_validated_and_belong_to_the_model_called(
        database_url: str, redis_url: str) -> None:
    from pgreembed.config import Budget, parse_settings
    from pgreembed.embedding.budgets import configured_budget
    from pgreembed.embedding.ratelimit import limiter_for_model
    from pgreembed.errors import ConfigError
    from pgreembed.store.budgets import record_budget
    from pgreembed.store.pool import close_pools, connect
    from pgreembed.store.setup import ensure_model, init_target

    def target(name: str, **extra: object) -> dict[str, object]:
        return {"name": name, "table": "docs", "text_column": "body", "vector_column": "v",
                "provider": "openai", "model": "fake-384", "dimensions": 384, **extra}

    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    for value, message in [("many", "must be an integer, got 'many'"), (0, "must be > 0"),
                           (True, "must be an integer")]:
        with pytest.raises(ConfigError, match="target 'a'.tokens_per_minute: " + message):
            parse_settings({"target": [target("a", tokens_per_minute=value)]}, env)
        with pytest.raises(ConfigError, match=r"rate_limits.'big'.tokens_per_minute: "
                                              + message):
            parse_settings({"target": [target("a")],
                            "rate_limits": {"big": {"tokens_per_minute": value}}}, env)
    with pytest.raises(ConfigError, match=r"rate_limits.'big': unknown field\(s\) rpm"):
        parse_settings({"target": [target("a")], "rate_limits": {"big": {"rpm": 5}}}, env)
    settings = parse_settings({
        "target": [target("a", requests_per_minute=500, tokens_per_minute=90_000),
                   target("b", tokens_per_minute=50_000, dimensions=128, vector_column="v_b"),
                   target("c", model="other-384", vector_column="v_c")],
        "rate_limits": {"fake-384": {"requests_per_minute": 700},
                        "big-3072": {"tokens_per_minute": 9_000}}}, env)
    # Targets of one model (any dimensions) and its rate_limits table: the smallest wins.
    assert configured_budget(settings, "openai", "fake-384") == Budget(500, 50_000)
    assert configured_budget(settings, "openai", "big-3072") == Budget(None, 9_000)
    assert not configured_budget(settings, "openai", "other-384")

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
    init_target(database_url, settings.target("a"))
    try:
        other = limiter_for_model(settings, "openai", "other-384")
        big = limiter_for_model(settings, "openai", "big-3072")
        assert not other.limited and other.reserve(10**9) == 0.0
        assert big.budget() == Budget(None, 9_000)
        # What `migrate start --requests-per-minute` records reaches limiters built later...
        with connect(database_url) as conn:
            model = settings.target("c")
            record_budget(conn, ensure_model(conn, model), Budget(40, None))
            conn.commit()
        assert limiter_for_model(settings, "openai", "other-384").budget() == Budget(40, None)
        # ...and one-key-per-model limiters: both use the Redis key of the model name.
        assert other.name == "openai:other-384" and big.name == "openai:big-3072"
    finally:
        close_pools()
