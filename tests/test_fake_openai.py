"""The fake OpenAI server, exercised over real HTTP with the real openai client."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from pgreembed.testing.fake_openai import FakeOpenAIServer
from pgreembed.testing.fake_vectors import fake_token_count, fake_vector, model_dims
from tests.helpers import wait_for

KEY = "sk-test-fake-key"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(api_key=KEY) as srv:
        yield srv


@pytest.fixture
def client(server: FakeOpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=10) as c:
        yield c


def http(server: FakeOpenAIServer, method: str, path: str, body: Any = None,
         key: str | None = KEY) -> tuple[int, Any, Any]:
    """Plain urllib call: returns (status, headers, decoded JSON body)."""
    url = server.base_url.removesuffix("/v1") + path
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


# -- pure helpers ----------------------------------------------------------------
def test_token_count_is_ceil_of_utf8_bytes_over_four() -> None:
    assert fake_token_count("a") == 1
    assert fake_token_count("abcd") == 1
    assert fake_token_count("abcde") == 2
    assert fake_token_count("é" * 4) == 2  # 8 UTF-8 bytes
    assert fake_token_count("") == 1


def test_fake_vector_is_unit_norm_deterministic_and_text_sensitive() -> None:
    a = fake_vector("m", "hello", 64)
    assert a.dtype == np.float32 and a.shape == (64,)
    assert abs(float(np.linalg.norm(a)) - 1.0) < 1e-5
    assert np.array_equal(a, fake_vector("m", "hello", 64))
    assert not np.allclose(a, fake_vector("m", "hello!", 64))
    assert not np.allclose(a, fake_vector("m2", "hello", 64))
    # A shorter vector is the renormalised prefix (Matryoshka-style truncation).
    short = fake_vector("m", "hello", 8)
    assert np.allclose(short, a[:8] / np.linalg.norm(a[:8]), atol=1e-6)


def test_fake_vector_is_stable_across_processes() -> None:
    code = ("from pgreembed.testing.fake_vectors import fake_vector;"
            "print(fake_vector('text-embedding-3-small', 'héllo', 16).tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=30).stdout.strip()
    local = fake_vector("text-embedding-3-small", "héllo", 16)
    assert bytes.fromhex(out) == local.tobytes()


# -- embeddings ------------------------------------------------------------------
def test_float_base64_and_default_encodings_decode_to_the_same_vector(
        client: openai.OpenAI) -> None:
    texts = ["hello", "wörld", "third"]
    expected = [fake_vector("fake-32", t, 32) for t in texts]
    as_float = client.embeddings.create(input=texts, model="fake-32", encoding_format="float")
    as_b64 = client.embeddings.create(input=texts, model="fake-32", encoding_format="base64")
    default = client.embeddings.create(input=texts, model="fake-32")
    assert as_float.object == "list" and as_float.model == "fake-32"
    assert [d.index for d in as_float.data] == [0, 1, 2]
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == sum(
        fake_token_count(t) for t in texts)
    for i, want in enumerate(expected):
        assert np.array_equal(np.array(as_float.data[i].embedding, dtype=np.float32), want)
        # An explicit base64 request comes back as the raw string (typed as list[float]).
        raw = as_b64.data[i].embedding
        assert isinstance(raw, str)
        assert np.array_equal(np.frombuffer(base64.b64decode(raw), dtype="<f4"), want)
        # Without encoding_format the client asks for base64 and decodes it itself.
        assert np.array_equal(np.array(default.data[i].embedding, dtype=np.float32), want)


def test_single_string_input(client: openai.OpenAI) -> None:
    resp = client.embeddings.create(input="just one", model="text-embedding-3-small")
    assert len(resp.data) == 1 and len(resp.data[0].embedding) == 1536


@pytest.mark.parametrize(("model", "dims"), [
    ("text-embedding-3-small", 1536), ("text-embedding-3-large", 3072),
    ("text-embedding-ada-002", 1536), ("fake-384", 384), ("anything-7", 7),
    ("my-model", 1536),
])
def test_model_dimensions(client: openai.OpenAI, model: str, dims: int) -> None:
    assert model_dims(model) == dims
    resp = client.embeddings.create(input=["x"], model=model)
    assert len(resp.data[0].embedding) == dims


def test_dimensions_parameter_rules(client: openai.OpenAI) -> None:
    resp = client.embeddings.create(input=["x"], model="text-embedding-3-large", dimensions=256)
    got = np.array(resp.data[0].embedding, dtype=np.float32)
    assert np.array_equal(got, fake_vector("text-embedding-3-large", "x", 256))
    assert len(client.embeddings.create(input=["x"], model="fake-64", dimensions=5)
               .data[0].embedding) == 5
    for model, dims in [("text-embedding-ada-002", 256), ("my-model", 8),
                        ("text-embedding-3-small", 1537), ("fake-8", 0)]:
        with pytest.raises(openai.BadRequestError) as exc:
            client.embeddings.create(input=["x"], model=model, dimensions=dims)
        assert exc.value.status_code == 400 and exc.value.param == "dimensions"


def test_validation_errors_name_the_input(client: openai.OpenAI) -> None:
    def bad(inputs: list[str]) -> openai.BadRequestError:
        with pytest.raises(openai.BadRequestError) as exc:
            client.embeddings.create(input=inputs, model="fake-4")
        assert exc.value.type == "invalid_request_error"
        return exc.value

    err = bad(["ok", ""])
    assert "input[1]" in err.message and err.code == "empty_string"
    assert bad([]).code == "empty_array"
    assert bad(["a"] * 2049).code == "array_above_max_length"
    client.embeddings.create(input=["ok", "a" * 4 * 8192], model="fake-4")  # exactly 8192
    err = bad(["ok", "fine", "a" * (4 * 8192 + 1)])
    assert "input[2]" in err.message and err.code == "context_length_exceeded"
    err = bad(["a" * 4 * 8000] * 38)  # each fits, 304,000 in total does not
    assert err.code == "max_tokens_per_request"
    assert re.findall(r"Requested (\d+) tokens, max (\d+) tokens", err.message) == [
        ("304000", "300000")], err.message


def test_auth_required_and_key_not_echoed(server: FakeOpenAIServer) -> None:
    status, _, body = http(server, "POST", "/v1/embeddings",
                           {"input": ["x"], "model": "fake-4"}, key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    wrong = "sk-wrong-secret-123"
    with (openai.OpenAI(base_url=server.base_url, api_key=wrong, max_retries=0) as c,
          pytest.raises(openai.AuthenticationError) as exc):
        c.embeddings.create(input=["x"], model="fake-4")
    assert wrong not in exc.value.message
    assert server.stats()["status_counts"] == {"401": 2}


# -- fault injection -------------------------------------------------------------
def test_rate_limit_count_sets_retry_after_headers(
        server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_faults(rate_limit_count=1, rate_limit_retry_after=2.5,
                      rate_limit_retry_after_ms=2500)
    with pytest.raises(openai.RateLimitError) as exc:
        client.embeddings.create(input=["x"], model="fake-4")
    assert exc.value.code == "rate_limit_exceeded" and exc.value.type == "requests"
    assert exc.value.response.headers["retry-after"] == "2.5"
    assert exc.value.response.headers["retry-after-ms"] == "2500"
    assert client.embeddings.create(input=["x"], model="fake-4").data  # only the next 1


def test_insufficient_quota_has_no_retry_after(
        server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_faults(quota_count=1)
    with pytest.raises(openai.RateLimitError) as exc:
        client.embeddings.create(input=["x"], model="fake-4")
    assert exc.value.code == "insufficient_quota" and exc.value.type == "insufficient_quota"
    assert "retry-after" not in exc.value.response.headers


def test_500_then_recovers(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_faults(error_500_count=2)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as exc:
            client.embeddings.create(input=["x"], model="fake-4")
        assert exc.value.status_code == 500 and exc.value.type == "server_error"
    client.embeddings.create(input=["x"], model="fake-4")
    assert server.stats()["status_counts"] == {"500": 2, "200": 1}


def test_fault_precedence_and_counters_only_decrement_when_used(
        server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_faults(error_500_count=1, quota_count=1, rate_limit_count=1)
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(input=["x"], model="fake-4")
    with pytest.raises(openai.RateLimitError) as exc:
        client.embeddings.create(input=["x"], model="fake-4")
    assert exc.value.code == "insufficient_quota"
    with pytest.raises(openai.RateLimitError) as exc:
        client.embeddings.create(input=["x"], model="fake-4")
    assert exc.value.code == "rate_limit_exceeded"
    client.embeddings.create(input=["x"], model="fake-4")


def test_timeout_fault_makes_client_time_out(
        server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_faults(timeout_count=1, timeout_seconds=2)
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        client.embeddings.create(input=["x"], model="fake-4", timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert client.embeddings.create(input=["x"], model="fake-4", timeout=1).data


def test_latency_and_max_concurrency(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_faults(latency=0.4)
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda t: client.embeddings.create(input=[t], model="fake-4"), "abcd"))
    assert 0.4 <= time.monotonic() - started < 1.5
    assert server.stats()["max_concurrency"] == 4


def test_wrong_dims_affects_only_next_success(
        server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_faults(wrong_dims_count=1)
    with pytest.raises(openai.BadRequestError):  # a failure does not use the counter
        client.embeddings.create(input=[""], model="fake-16")
    assert len(client.embeddings.create(input=["x"], model="fake-16").data[0].embedding) == 17
    assert len(client.embeddings.create(input=["x"], model="fake-16").data[0].embedding) == 16


def test_bad_input_marker_names_the_index(
        server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_faults(bad_input_marker="POISON")
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(input=["a", "b", "xxPOISONxx", "d"], model="fake-4")
    assert exc.value.type == "invalid_request_error" and exc.value.param == "input[2]"
    assert "input[2]" in exc.value.message
    assert client.embeddings.create(input=["a", "b"], model="fake-4").data


def test_tokens_per_minute_limiter(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_faults(tokens_per_minute=35)
    text = "x" * 40  # 10 tokens
    for _ in range(3):
        client.embeddings.create(input=[text], model="fake-4")
    with pytest.raises(openai.RateLimitError) as exc:
        client.embeddings.create(input=[text], model="fake-4")
    assert exc.value.type == "tokens" and exc.value.code == "rate_limit_exceeded"
    assert 55 < float(exc.value.response.headers["retry-after"]) <= 60
    with pytest.raises(openai.RateLimitError):  # rejected requests used no budget...
        client.embeddings.create(input=[text], model="fake-4")
    client.embeddings.create(input=["x" * 20], model="fake-4")  # ...5 tokens still fit
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(input=["x"], model="fake-4")
    assert server.stats()["status_counts"] == {"200": 4, "429": 3}


def test_requests_per_minute_limiter(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_faults(requests_per_minute=2)
    client.embeddings.create(input=["a"], model="fake-4")
    client.embeddings.create(input=["b"], model="fake-4")
    with pytest.raises(openai.RateLimitError) as exc:
        client.embeddings.create(input=["c"], model="fake-4")
    assert exc.value.type == "requests"
    assert 55 < float(exc.value.response.headers["retry-after"]) <= 60
    server.reset()
    client.embeddings.create(input=["c"], model="fake-4")


def test_model_limits_apply_to_that_model_only(server: FakeOpenAIServer,
                                               client: openai.OpenAI) -> None:
    server.set_faults(model_limits={"fake-8": {"requests_per_minute": 2,
                                               "tokens_per_minute": 25}})
    client.embeddings.create(input=["x" * 40], model="fake-8")  # 10 tokens
    with pytest.raises(openai.RateLimitError) as exc:
        client.embeddings.create(input=["x" * 80], model="fake-8")  # 20: over 25
    assert exc.value.type == "tokens" and "for fake-8" in exc.value.message
    assert 55 < float(exc.value.response.headers["retry-after"]) <= 60
    for _ in range(5):  # another model is not limited
        client.embeddings.create(input=["x" * 80], model="fake-4")
    client.embeddings.create(input=["x" * 40], model="fake-8")  # the 2nd request fits
    with pytest.raises(openai.RateLimitError) as exc:
        client.embeddings.create(input=["x"], model="fake-8")
    assert exc.value.type == "requests"
    with pytest.raises(ValueError, match="positive integer"):
        server.set_faults(model_limits={"fake-8": {"tokens_per_minute": 0}})
    with pytest.raises(ValueError, match="requests_per_minute"):
        server.set_faults(model_limits={"fake-8": {"rpm": 5}})


def test_stats(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    client.embeddings.create(input=["a", "b", "a"], model="fake-4")
    client.embeddings.create(input="abcdefgh", model="fake-4")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(input=["c", ""], model="fake-4")
    stats = server.stats()
    assert stats["requests"] == 3
    assert stats["status_counts"] == {"200": 2, "400": 1}
    assert stats["inputs_embedded"] == 4
    assert stats["tokens_embedded"] == 5
    assert stats["text_counts"] == {"a": 2, "b": 1, "abcdefgh": 1}
    assert stats["max_concurrency"] == 1
    stats["requests"] = 99  # a copy
    assert server.stats()["requests"] == 3


def test_http_control_endpoints(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    status, _, faults = http(server, "POST", "/_control", {"error_500_count": 1})
    assert status == 200 and faults["error_500_count"] == 1
    assert http(server, "POST", "/_control", {"bad_input_marker": "!"})[2]["error_500_count"] == 1
    assert http(server, "GET", "/_control")[2]["bad_input_marker"] == "!"
    status, _, body = http(server, "POST", "/_control", {"no_such_fault": 1})
    assert status == 400 and "no_such_fault" in body["error"]["message"]
    status, _, body = http(server, "POST", "/_control", {"latency": "slow"})
    assert status == 400 and "latency" in body["error"]["message"]
    with pytest.raises(ValueError, match="timeout_count"):
        server.set_faults(timeout_count=1.5)
    with pytest.raises(openai.InternalServerError):
        client.embeddings.create(input=["x"], model="fake-4")
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(input=["x!"], model="fake-4")
    status, _, stats = http(server, "GET", "/_stats", key=None)
    assert status == 200 and stats["requests"] == 2
    assert stats["status_counts"] == {"500": 1, "400": 1}
    assert http(server, "POST", "/_reset", {})[0] == 200
    assert http(server, "GET", "/_stats")[2]["requests"] == 0
    client.embeddings.create(input=["x!"], model="fake-4")  # marker cleared
    assert http(server, "GET", "/v1/nope")[0] == 404


# -- batch API -------------------------------------------------------------------
def _batch_jsonl(rows: list[tuple[str, list[str]]], model: str = "fake-8") -> bytes:
    return "\n".join(json.dumps({
        "custom_id": cid, "method": "POST", "url": "/v1/embeddings",
        "body": {"model": model, "input": inputs, "encoding_format": "float"}})
        for cid, inputs in rows).encode() + b"\n"


def test_batch_round_trip(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.set_faults(batch_delay=0.3, bad_input_marker="POISON")
    rows = [("row-1", ["alpha", "beta"]), ("row-2", ["gamma"]), ("row-3", ["a POISON b"])]
    uploaded = client.files.create(file=("in.jsonl", _batch_jsonl(rows)), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(_batch_jsonl(rows))
    assert client.files.content(uploaded.id).content == _batch_jsonl(rows)
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    assert batch.status in ("validating", "in_progress")
    batch = wait_for(lambda: (b := client.batches.retrieve(batch.id)).status in (
        "completed", "failed") and b, timeout=5, interval=0.05, message="the batch to end")
    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (3, 2, 1)
    assert batch.output_file_id and batch.error_file_id
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
    assert sorted(o["custom_id"] for o in out) == ["row-1", "row-2"]
    inputs = dict(rows)
    for line in out:
        assert line["error"] is None and line["response"]["status_code"] == 200
        data = line["response"]["body"]["data"]
        for item, text in zip(data, inputs[line["custom_id"]], strict=True):
            got = np.array(item["embedding"], dtype=np.float32)
            assert np.array_equal(got, fake_vector("fake-8", text, 8))
    errors = client.files.content(batch.error_file_id).text.splitlines()
    assert len(errors) == 1
    failed = json.loads(errors[0])
    assert failed["custom_id"] == "row-3" and failed["response"]["status_code"] == 400
    assert "input[0]" in failed["response"]["body"]["error"]["message"]
    assert server.stats()["text_counts"] == {"alpha": 1, "beta": 1, "gamma": 1}


def test_batch_over_50000_inputs_fails(client: openai.OpenAI) -> None:
    rows = [(f"r{i}", ["a"] * 2048) for i in range(25)]  # 51,200 inputs
    uploaded = client.files.create(file=("big.jsonl", _batch_jsonl(rows)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                  completion_window="24h")
    batch = client.batches.retrieve(batch.id)
    assert batch.status == "failed" and batch.output_file_id is None
    assert batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == "too_many_inputs"


def test_unknown_file_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-missing")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id="file-missing", endpoint="/v1/embeddings",
                              completion_window="24h")


# -- CLI -------------------------------------------------------------------------
def test_cli_serves_until_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "pgreembed.testing.fake_openai", "--port", "0",
         "--api-key", KEY], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:") and base_url.endswith("/v1")
        with openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=5) as c:
            resp = c.embeddings.create(input=["hi"], model="fake-3")
        assert np.array_equal(np.array(resp.data[0].embedding, dtype=np.float32),
                              fake_vector("fake-3", "hi", 3))
        proc.terminate()
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
