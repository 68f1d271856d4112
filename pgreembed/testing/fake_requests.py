"""The fake provider's API surface: request parsing, injectable faults, error bodies, responses."""

from __future__ import annotations

import base64
import json
import typing
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pybase64

from pgreembed.testing.fake_vectors import (
    DIMENSIONS_PREFIXES,
    MAX_BATCH_INPUTS,
    MAX_INPUT_TOKENS,
    MAX_INPUTS,
    MAX_REQUEST_TOKENS,
    fake_token_count,
    model_dims,
    model_vectors,
)


class ApiError(Exception):
    """An OpenAI-style error answer: raising it anywhere short-circuits the request."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.param, self.headers = param, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


@dataclass
class Faults:
    """Injectable misbehaviour; ``*_count`` fields mean "the next N affected requests"."""

    latency: float = 0.0
    # Extra latency for one model's embedding requests (a slow provider on one side of a
    # migration, to race its writes against a swap).
    slow_model: str | None = None
    slow_model_latency: float = 0.0
    rate_limit_count: int = 0
    rate_limit_retry_after: float = 1.0
    rate_limit_retry_after_ms: float | None = None
    quota_count: int = 0
    error_500_count: int = 0
    timeout_count: int = 0
    timeout_seconds: float = 30.0
    wrong_dims_count: int = 0
    bad_input_marker: str | None = None
    tokens_per_minute: int | None = None
    requests_per_minute: int | None = None
    # Limits of one model on top of the global ones, like an account limited per model:
    # {"text-embedding-3-large": {"tokens_per_minute": 1000, "requests_per_minute": 5}}.
    model_limits: dict[str, dict[str, int]] = field(default_factory=dict)
    batch_delay: float = 0.0
    # Seconds each file content download takes (a Batch API output file of 50,000 inputs
    # is hundreds of MB): lets a test watch what the client holds open meanwhile.
    file_content_delay: float = 0.0
    # The next N 401 answers quote the rejected key, as some servers do: lets a test
    # prove the client side redacts what a server echoes back.
    echo_rejected_key_count: int = 0
    # A request with an input containing this text waits until the fault is cleared
    # (set_faults(hold_marker=None), reset() or stop()): a test's window between a
    # client's request and its answer, e.g. to commit a migration swap meanwhile.
    hold_marker: str | None = None
    # Models that are a degraded copy of another: {"fake-noisy-384": {"copy_of": "fake-384",
    # "noise": 2.0}} answers fake-384's vectors plus fresh Gaussian noise of that expected
    # norm on every call (renormalised), so the same text embeds differently each time: a
    # worse model whose quality a test knows (noise 0: an identical copy).
    degraded_models: dict[str, dict[str, Any]] = field(default_factory=dict)


FAULT_TYPES = typing.get_type_hints(Faults)


def coerce_fault(name: str, value: Any) -> Any:
    """Check a fault value from JSON/kwargs, so a bad one fails at set time, not later."""
    hint = FAULT_TYPES[name]
    if name == "model_limits":
        return _coerce_model_limits(value)
    if name == "degraded_models":
        return _coerce_degraded_models(value)
    if value is None and type(None) in typing.get_args(hint):
        return None
    kind = next(t for t in (int, float, str) if t is hint or t in typing.get_args(hint))
    if isinstance(value, bool) or not isinstance(value, int | float if kind is float else kind):
        raise ValueError(f"fault {name!r} must be {kind.__name__}, got {value!r}")
    return kind(value)


def _coerce_model_limits(value: Any) -> dict[str, dict[str, int]]:
    """{model: {"requests_per_minute"|"tokens_per_minute": positive int}}, checked."""
    if not isinstance(value, dict):
        raise ValueError(f"fault 'model_limits' must be an object, got {value!r}")
    checked: dict[str, dict[str, int]] = {}
    for model, limits in value.items():
        if not isinstance(limits, dict) or not set(limits) <= {"requests_per_minute",
                                                               "tokens_per_minute"}:
            raise ValueError(f"fault 'model_limits'[{model!r}] must map requests_per_minute"
                             f" and/or tokens_per_minute to integers, got {limits!r}")
        for key, limit in limits.items():
            if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
                raise ValueError(f"fault 'model_limits'[{model!r}].{key} must be a positive"
                                 f" integer, got {limit!r}")
        checked[str(model)] = dict(limits)
    return checked


def _coerce_degraded_models(value: Any) -> dict[str, dict[str, Any]]:
    """{model: {"copy_of": another model, "noise": expected noise norm >= 0}}, checked."""
    if not isinstance(value, dict):
        raise ValueError(f"fault 'degraded_models' must be an object, got {value!r}")
    checked: dict[str, dict[str, Any]] = {}
    for model, spec in value.items():
        if (not isinstance(spec, dict) or set(spec) != {"copy_of", "noise"}
                or not isinstance(spec["copy_of"], str) or isinstance(spec["noise"], bool)
                or not isinstance(spec["noise"], int | float) or spec["noise"] < 0):
            raise ValueError(f"fault 'degraded_models'[{model!r}] must be {{'copy_of': model,"
                             f" 'noise': number >= 0}}, got {spec!r}")
        checked[str(model)] = {"copy_of": spec["copy_of"], "noise": float(spec["noise"])}
    return checked


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated ``/v1/embeddings`` body."""

    model: str
    inputs: list[str]
    tokens: list[int]
    dims: int
    encoding: str


def string_inputs(body: object) -> list[str]:
    """Best-effort inputs of a not-yet-validated body (the rate limiter needs tokens,
    before the request is validated)."""
    raw = body.get("input") if isinstance(body, dict) else None
    items = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return [s for s in items if isinstance(s, str)]


def parse_embedding_request(body: object) -> EmbeddingRequest:
    """Validate like the real API does, naming the offending input index."""
    if not isinstance(body, dict):
        raise bad_request("We could not parse the JSON body of your request.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter", "model")
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list):
        raise bad_request("Invalid 'input': expected a string or an array of strings.", "input")
    if not inputs:
        raise bad_request("Invalid 'input': empty array, expected 1 or more.", "input",
                          "empty_array")
    if len(inputs) > MAX_INPUTS:
        raise bad_request(f"Invalid 'input': array too long, expected at most {MAX_INPUTS}"
                          f" items but got {len(inputs)}.", "input", "array_above_max_length")
    tokens = []
    for i, text in enumerate(inputs):
        where = f"input[{i}]"
        if not isinstance(text, str):
            raise bad_request(f"Invalid '{where}': expected a string.", where, "invalid_type")
        if not text:
            raise bad_request(f"Invalid '{where}': empty string.", where, "empty_string")
        n = fake_token_count(text)
        if n > MAX_INPUT_TOKENS:
            raise bad_request(f"Invalid '{where}': maximum context length is"
                              f" {MAX_INPUT_TOKENS} tokens, but {n} were requested.", where,
                              "context_length_exceeded")
        tokens.append(n)
    if sum(tokens) > MAX_REQUEST_TOKENS:
        raise bad_request(f"Requested {sum(tokens)} tokens, max {MAX_REQUEST_TOKENS} tokens"
                          " per request", None, "max_tokens_per_request")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad_request("Invalid 'encoding_format': expected 'float' or 'base64'.",
                          "encoding_format")
    dims = model_dims(model)
    requested = body.get("dimensions")
    if requested is not None:
        if not model.startswith(DIMENSIONS_PREFIXES):
            raise bad_request("This model does not support specifying dimensions.", "dimensions")
        if type(requested) is not int or not 0 < requested <= dims:
            raise bad_request(f"Invalid 'dimensions': must be an integer between 1 and {dims}.",
                       "dimensions")
        dims = requested
    return EmbeddingRequest(model, inputs, tokens, dims, encoding)


def check_marker(inputs: list[str], marker: str | None) -> None:
    """Reject a "poison" row so clients can practise bisecting a failing batch."""
    for i, text in enumerate(inputs):
        if marker and marker in text:
            raise bad_request(f"Invalid 'input[{i}]': input rejected by the server.", f"input[{i}]")


def embedding_response(req: EmbeddingRequest, extra_dims: int = 0,
                       degraded: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """OpenAI's exact response shape; base64 is little-endian float32."""
    vectors = model_vectors(req.model, req.inputs, req.dims + extra_dims, degraded
                            ).astype("<f4", copy=False)
    data = [{"object": "embedding", "index": i,
             "embedding": (base64.b64encode(vec.tobytes()).decode("ascii")
                           if req.encoding == "base64" else vec.tolist())}
            for i, vec in enumerate(vectors)]
    total = sum(req.tokens)
    return {"object": "list", "data": data, "model": req.model,
            "usage": {"prompt_tokens": total, "total_tokens": total}}


def embedding_body(req: EmbeddingRequest, extra_dims: int = 0,
                   degraded: dict[str, dict[str, Any]] | None = None) -> bytes:
    """`embedding_response` as JSON bytes. For base64, written directly: base64 needs
    no JSON escaping, and json.dumps scanning megabytes of it was this server's top cost."""
    if req.encoding != "base64":
        return json.dumps(embedding_response(req, extra_dims, degraded)).encode()
    vectors = model_vectors(req.model, req.inputs, req.dims + extra_dims, degraded
                            ).astype("<f4", copy=False)
    total = sum(req.tokens)
    tail = json.dumps({"model": req.model,
                       "usage": {"prompt_tokens": total, "total_tokens": total}})
    parts = [b'{"object":"list","data":[']
    for i, vec in enumerate(vectors):
        parts += (b'{"object":"embedding","index":%d,"embedding":"' % i,
                  pybase64.b64encode(vec.tobytes()), b'"},')
    parts[-1] = b'"}],'  # no comma after the last item
    parts.append(tail[1:].encode())
    return b"".join(parts)  # one copy of the megabytes, not one per item


def refusal(window: deque[tuple[float, int]], rpm: int | None, tpm: int | None, tokens: int,
             now: float) -> tuple[float, str, int, int] | None:
    """(seconds to wait, "requests"|"tokens", limit, tokens used) when a request of
    `tokens` does not fit the 60 s `window` now; None when it does."""
    while window and window[0][0] <= now - 60:
        window.popleft()
    wait, kind, limit = 0.0, "", 0
    if rpm and len(window) >= rpm:
        wait = window[len(window) - rpm][0] + 60 - now
        kind, limit = "requests", rpm
    used = sum(n for _, n in window)
    if tpm and used + tokens > tpm:
        token_wait, freed = 60.0, 0  # 60 s if the request can never fit
        for admitted_at, n in window:
            freed += n
            if used - freed + tokens <= tpm:
                token_wait = admitted_at + 60 - now
                break
        wait, kind, limit = max(wait, token_wait), "tokens", tpm
    return (wait, kind, limit, used) if kind else None


def parse_batch_file(data: bytes) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Parse JSONL and enforce the request/input caps; returns (lines, problem)."""
    try:
        lines = [json.loads(text) for text in data.splitlines() if text.strip()]
    except ValueError:
        lines = [None]
    if not all(isinstance(line, dict) for line in lines):
        return [], {"code": "invalid_json_line", "line": None, "param": None,
                    "message": "Every line must be a JSON object."}
    n_inputs = sum(len(string_inputs(line.get("body"))) for line in lines)
    if not lines or len(lines) > MAX_BATCH_INPUTS or n_inputs > MAX_BATCH_INPUTS:
        return [], {"code": "too_many_inputs", "line": None, "param": None,
                    "message": f"Batch has {len(lines)} requests and {n_inputs} inputs; "
                    f"between 1 and {MAX_BATCH_INPUTS} are allowed."}
    return lines, None


def loads_json(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        raise bad_request("We could not parse the JSON body of your request.") from None
