"""A local, deterministic, OpenAI-compatible embeddings server.

Tests, the demo and benchmarks talk to it over real HTTP with the real ``openai``
client, so retries, timeouts, batching and error handling are exercised end to end
without network access or cost. Faults (429s, 500s, timeouts, wrong dimensions,
poison inputs, TPM/RPM limits global or per model, requests held until released, one
model slowed) can be injected from Python or over HTTP.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import json
import math
import re
import signal
import sys
import threading
import time
import traceback
import typing
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import numpy.typing as npt
import pybase64

MAX_INPUTS = 2048
MAX_INPUT_TOKENS = 8192
MAX_REQUEST_TOKENS = 300_000
MAX_BATCH_INPUTS = 50_000
DEFAULT_DIMS = 1536
MODEL_DIMS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
_DIMENSIONS_PREFIXES = ("text-embedding-3", "fake-")


def fake_token_count(text: str) -> int:
    """Cheap, deterministic stand-in for tiktoken (~4 UTF-8 bytes per token)."""
    return max(1, math.ceil(len(text.encode("utf-8")) / 4))


def model_dims(model: str) -> int:
    """Native size of ``model``: known OpenAI names, ``name-<digits>``, else 1536."""
    if model in MODEL_DIMS:
        return MODEL_DIMS[model]
    match = re.search(r"-(\d+)$", model)
    return int(match.group(1)) if match and int(match.group(1)) > 0 else DEFAULT_DIMS


def fake_vectors(model: str, texts: Sequence[str], dims: int) -> npt.NDArray[np.float32]:
    """One unit-norm row per text, from SHAKE-256(model NUL text): stable across processes.

    A shorter vector is the renormalised prefix of a longer one (SHAKE's output
    for fewer bytes is a prefix), like the Matryoshka truncation ``dimensions``
    performs for text-embedding-3 models. Hashing per text but normalising the
    whole matrix at once keeps this server cheap: it shares the benchmark's cores.
    """
    raw = b"".join(hashlib.shake_256(f"{model}\0{text}".encode()).digest(2 * dims)
                   for text in texts)
    matrix = np.frombuffer(raw, dtype="<i2").reshape(len(texts), dims).astype(np.float32)
    matrix += np.float32(0.5)  # never 0
    matrix /= np.sqrt(np.einsum("ij,ij->i", matrix, matrix))[:, None]
    return matrix


def fake_vector(model: str, text: str, dims: int) -> npt.NDArray[np.float32]:
    """The vector this server returns for ``text`` (see `fake_vectors`)."""
    return fake_vectors(model, [text], dims)[0]


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


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
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


_FAULT_TYPES = typing.get_type_hints(Faults)


def _coerce(name: str, value: Any) -> Any:
    """Check a fault value from JSON/kwargs, so a bad one fails at set time, not later."""
    hint = _FAULT_TYPES[name]
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


def model_vectors(model: str, texts: Sequence[str], dims: int,
                  degraded: dict[str, dict[str, Any]] | None = None
                  ) -> npt.NDArray[np.float32]:
    """`fake_vectors`, or for a degraded model its base model's plus fresh noise."""
    spec = (degraded or {}).get(model)
    if spec is None:
        return fake_vectors(model, texts, dims)
    matrix = fake_vectors(spec["copy_of"], texts, dims)
    if spec["noise"] > 0:
        noise = np.random.default_rng().standard_normal(matrix.shape).astype(np.float32)
        matrix = matrix + noise * np.float32(spec["noise"] / math.sqrt(dims))
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix


@dataclass(frozen=True)
class EmbeddingRequest:
    """A validated ``/v1/embeddings`` body."""

    model: str
    inputs: list[str]
    tokens: list[int]
    dims: int
    encoding: str


def _string_inputs(body: object) -> list[str]:
    """Best-effort inputs of a not-yet-validated body (the rate limiter needs tokens)."""
    raw = body.get("input") if isinstance(body, dict) else None
    items = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    return [s for s in items if isinstance(s, str)]


def parse_embedding_request(body: object) -> EmbeddingRequest:
    """Validate like the real API does, naming the offending input index."""
    if not isinstance(body, dict):
        raise _bad("We could not parse the JSON body of your request.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("you must provide a model parameter", "model")
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list):
        raise _bad("Invalid 'input': expected a string or an array of strings.", "input")
    if not inputs:
        raise _bad("Invalid 'input': empty array, expected 1 or more.", "input", "empty_array")
    if len(inputs) > MAX_INPUTS:
        raise _bad(f"Invalid 'input': array too long, expected at most {MAX_INPUTS} items but "
                   f"got {len(inputs)}.", "input", "array_above_max_length")
    tokens = []
    for i, text in enumerate(inputs):
        where = f"input[{i}]"
        if not isinstance(text, str):
            raise _bad(f"Invalid '{where}': expected a string.", where, "invalid_type")
        if not text:
            raise _bad(f"Invalid '{where}': empty string.", where, "empty_string")
        n = fake_token_count(text)
        if n > MAX_INPUT_TOKENS:
            raise _bad(f"Invalid '{where}': maximum context length is {MAX_INPUT_TOKENS} tokens, "
                       f"but {n} were requested.", where, "context_length_exceeded")
        tokens.append(n)
    if sum(tokens) > MAX_REQUEST_TOKENS:
        raise _bad(f"Requested {sum(tokens)} tokens, max {MAX_REQUEST_TOKENS} tokens per request",
                   None, "max_tokens_per_request")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _bad("Invalid 'encoding_format': expected 'float' or 'base64'.", "encoding_format")
    dims = model_dims(model)
    requested = body.get("dimensions")
    if requested is not None:
        if not model.startswith(_DIMENSIONS_PREFIXES):
            raise _bad("This model does not support specifying dimensions.", "dimensions")
        if type(requested) is not int or not 0 < requested <= dims:
            raise _bad(f"Invalid 'dimensions': must be an integer between 1 and {dims}.",
                       "dimensions")
        dims = requested
    return EmbeddingRequest(model, inputs, tokens, dims, encoding)


def check_marker(inputs: list[str], marker: str | None) -> None:
    """Reject a "poison" row so clients can practise bisecting a failing batch."""
    for i, text in enumerate(inputs):
        if marker and marker in text:
            raise _bad(f"Invalid 'input[{i}]': input rejected by the server.", f"input[{i}]")


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


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] | None = None


def _json(status: int, obj: object, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(obj).encode(), "application/json", headers)


def _parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Byte-exact multipart/form-data parser (``cgi`` is gone in 3.13)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise _bad("Expected multipart/form-data with a boundary.")
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in body.split(b"--" + match.group(1).encode())[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        name = re.search(rb';\s*name="([^"]*)"', head)
        filename = re.search(rb';\s*filename="([^"]*)"', head)
        if name:
            parts[name.group(1).decode()] = (
                filename.group(1).decode() if filename else None, data.removesuffix(b"\r\n"))
    return parts


class FakeOpenAIServer:
    """Threaded HTTP server speaking the embeddings, files and batches APIs."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None) -> None:
        self.api_key = api_key
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._faults = Faults()
        self._stats = self._empty_stats()
        self._in_flight = 0
        # Sliding windows of admitted requests, (admitted at, tokens): the global one
        # under the key None, and one per model named in `model_limits`.
        self._windows: dict[str | None, deque[tuple[float, int]]] = {}
        self._files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._httpd = _HTTPServer((host, port), _Handler)
        self._httpd.app = self
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host!s}:{port}/v1"

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and wake handlers sleeping in latency/timeout faults."""
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults and stats ------------------------------------------------------
    def set_faults(self, **changes: Any) -> None:
        """Merge fault settings; unknown names raise ValueError (typos would hide bugs)."""
        unknown = set(changes) - set(_FAULT_TYPES)
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        coerced = {name: _coerce(name, value) for name, value in changes.items()}
        with self._lock:
            for name, value in coerced.items():
                setattr(self._faults, name, value)

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return asdict(self._faults)

    def reset(self) -> None:
        """Clear faults, stats and the rate-limit window (files and batches stay)."""
        with self._lock:
            self._faults = Faults()
            self._stats = self._empty_stats()
            self._windows.clear()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._stats)

    @staticmethod
    def _empty_stats() -> dict[str, Any]:
        return {"requests": 0, "status_counts": {}, "inputs_embedded": 0,
                "tokens_embedded": 0, "text_counts": {}, "max_concurrency": 0}

    def _take(self, name: str) -> bool:
        """Consume one unit of a "next N requests" fault if any is left."""
        with self._lock:
            left = getattr(self._faults, name)
            if left > 0:
                setattr(self._faults, name, left - 1)
            return bool(left > 0)

    def _record_success(self, req: EmbeddingRequest) -> None:
        with self._lock:
            self._stats["inputs_embedded"] += len(req.inputs)
            self._stats["tokens_embedded"] += sum(req.tokens)
            counts = self._stats["text_counts"]
            for text in req.inputs:
                counts[text] = counts.get(text, 0) + 1

    # -- request handling ------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        """Route one request; embeddings calls are counted in the stats."""
        if method == "POST" and path == "/v1/embeddings":
            with self._lock:
                self._stats["requests"] += 1
                self._in_flight += 1
                self._stats["max_concurrency"] = max(self._stats["max_concurrency"],
                                                     self._in_flight)
        try:
            resp = self._route(method, path, headers, body)
        except ApiError as err:
            resp = _json(err.status, err.body(), err.headers)
        except Exception:  # a bug here must not look like a network error to clients
            traceback.print_exc()
            resp = _json(500, ApiError(500, "fake server bug", "server_error").body())
        if method == "POST" and path == "/v1/embeddings":
            with self._lock:
                self._in_flight -= 1
                codes = self._stats["status_counts"]
                codes[str(resp.status)] = codes.get(str(resp.status), 0) + 1
        return resp

    def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        if (method, path) == ("GET", "/_stats"):
            return _json(200, self.stats())
        if (method, path) == ("GET", "/_control"):
            return _json(200, self.faults())
        if (method, path) == ("POST", "/_control"):
            changes = _loads(body)
            if not isinstance(changes, dict):
                raise _bad("expected a JSON object of fault fields")
            try:
                self.set_faults(**changes)
            except ValueError as exc:
                raise _bad(str(exc)) from None
            return _json(200, self.faults())
        if (method, path) == ("POST", "/_reset"):
            self.reset()
            return _json(200, {"ok": True})
        if path.startswith("/v1/"):
            self._check_auth(headers.get("authorization", ""))
            if self._faults.latency > 0:
                self._stopping.wait(self._faults.latency)
            if (method, path) == ("POST", "/v1/embeddings"):
                return self._embeddings(body)
            if (method, path) == ("POST", "/v1/files"):
                return self._upload(headers.get("content-type", ""), body)
            if (method, path) == ("POST", "/v1/batches"):
                return _json(200, self._create_batch(_loads(body)))
            if method == "GET" and (m := re.fullmatch(r"/v1/batches/([\w-]+)", path)):
                return _json(200, self._lookup(self._batches, m.group(1)))
            if method == "GET" and (m := re.fullmatch(r"/v1/files/([\w-]+)(/content)?", path)):
                obj, data = self._lookup(self._files, m.group(1))
                return Response(200, data, "application/octet-stream") if m[2] else _json(200, obj)
        raise ApiError(404, f"Invalid URL ({method} {path})")

    def _check_auth(self, header: str) -> None:
        if self.api_key is not None and header != f"Bearer {self.api_key}":
            # Never echo the presented key unless asked: it may be a real one sent by mistake.
            quoted = f": {header.removeprefix('Bearer ')}" if self._take(
                "echo_rejected_key_count") else ""
            raise ApiError(401, f"Incorrect API key provided{quoted}.",
                           "invalid_request_error", "invalid_api_key")

    def _embeddings(self, raw: bytes) -> Response:
        """Apply faults in documented precedence, then validate and embed."""
        if self._take("timeout_count"):
            self._stopping.wait(self._faults.timeout_seconds)
        if self._take("error_500_count"):
            raise ApiError(500, "The server had an error while processing your request. "
                           "Sorry about that!", "server_error")
        if self._take("quota_count"):
            raise ApiError(429, "You exceeded your current quota, please check your plan and "
                           "billing details.", "insufficient_quota", "insufficient_quota")
        if self._take("rate_limit_count"):
            raise self._rate_limited("requests", "Rate limit reached (injected).",
                                     self._faults.rate_limit_retry_after,
                                     self._faults.rate_limit_retry_after_ms)
        body = _loads(raw)
        self._admit(body)
        req = parse_embedding_request(body)
        if req.model == self._faults.slow_model and self._faults.slow_model_latency > 0:
            self._stopping.wait(self._faults.slow_model_latency)
        self._hold(req.inputs)
        check_marker(req.inputs, self._faults.bad_input_marker)
        payload = embedding_body(req, 1 if self._take("wrong_dims_count") else 0,
                                 self._faults.degraded_models)
        self._record_success(req)
        return Response(200, payload)

    def _hold(self, inputs: list[str]) -> None:
        """Keep the request waiting while `hold_marker` is set and one input contains it."""
        while (marker := self._faults.hold_marker) and any(marker in t for t in inputs):
            if self._stopping.wait(0.01):
                return

    @staticmethod
    def _rate_limited(kind: str, message: str, seconds: float,
                      ms: float | None = None) -> ApiError:
        headers = {"retry-after": f"{seconds:g}"}
        if ms is not None:
            headers["retry-after-ms"] = f"{ms:g}"
        return ApiError(429, message, kind, "rate_limit_exceeded", None, headers)

    def _admit(self, body: object) -> None:
        """Sliding 60 s windows for RPM/TPM, global and per model; a rejected request
        uses no budget of either."""
        tokens = sum(fake_token_count(s) for s in _string_inputs(body))
        model = body.get("model") if isinstance(body, dict) else None
        with self._lock:
            limits: list[tuple[str | None, int | None, int | None]] = [
                (None, self._faults.requests_per_minute, self._faults.tokens_per_minute)]
            per_model = self._faults.model_limits.get(model) if isinstance(model, str) else None
            if per_model:
                limits.append((model, per_model.get("requests_per_minute"),
                               per_model.get("tokens_per_minute")))
            now = time.monotonic()
            windows = [(key, self._windows.setdefault(key, deque()), rpm, tpm)
                       for key, rpm, tpm in limits if rpm or tpm]
            refused = next(((key, refusal) for key, window, rpm, tpm in windows
                            if (refusal := _refusal(window, rpm, tpm, tokens, now))), None)
            if refused is None:
                for _, window, _, _ in windows:
                    window.append((now, tokens))
                return
        key, (wait, kind, limit, used) = refused
        unit = "RPM" if kind == "requests" else "TPM"
        scope = f" for {model}" if key is not None else ""
        raise self._rate_limited(
            kind, f"Rate limit reached{scope} on {kind} per min ({unit}): Limit {limit}, "
            f"Used {used}, Requested {tokens}. Please try again in {wait:.3f}s.",
            round(wait, 3), math.ceil(wait * 1000))

    # -- files and batches -----------------------------------------------------
    def _new_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(data),
            "created_at": int(time.time()), "filename": filename, "purpose": purpose,
            "status": "processed"}
        with self._lock:
            self._files[obj["id"]] = (obj, data)
        return obj

    def _upload(self, content_type: str, body: bytes) -> Response:
        parts = _parse_multipart(content_type, body)
        if "file" not in parts or "purpose" not in parts:
            raise _bad("Missing required 'file' or 'purpose' form field.")
        filename, data = parts["file"]
        return _json(200, self._new_file(data, filename or "upload", parts["purpose"][1].decode()))

    def _lookup(self, table: dict[str, Any], object_id: str) -> Any:
        with self._lock:
            if object_id not in table:
                raise ApiError(404, f"No such object: '{object_id}'", code="not_found")
            return copy.deepcopy(table[object_id])

    def _create_batch(self, body: object) -> dict[str, Any]:
        if not isinstance(body, dict) or body.get("endpoint") != "/v1/embeddings":
            raise _bad("Only endpoint '/v1/embeddings' is supported.", "endpoint")
        if body.get("completion_window") != "24h":
            raise _bad("completion_window must be '24h'.", "completion_window")
        with self._lock:
            found = self._files.get(str(body.get("input_file_id")))
        if found is None:
            raise _bad("Invalid 'input_file_id': file not found.", "input_file_id")
        batch: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex[:24]}", "object": "batch",
            "endpoint": "/v1/embeddings", "input_file_id": found[0]["id"],
            "completion_window": "24h", "status": "validating", "created_at": int(time.time()),
            "output_file_id": None, "error_file_id": None, "errors": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata")}
        lines, problem = _parse_batch_file(found[1])
        with self._lock:
            self._batches[batch["id"]] = batch
            if problem:
                batch.update(status="failed", failed_at=int(time.time()), errors={
                    "object": "list", "data": [problem]})
                return dict(batch)
            batch.update(status="in_progress", in_progress_at=int(time.time()))
        if self._faults.batch_delay > 0:
            timer = threading.Timer(self._faults.batch_delay, self._run_batch, (batch, lines))
            timer.daemon = True
            timer.start()
        else:
            self._run_batch(batch, lines)
        with self._lock:
            return dict(batch)

    def _run_batch(self, batch: dict[str, Any], lines: list[dict[str, Any]]) -> None:
        """Answer each line; failures go to the error file, as in the real API."""
        out: list[str] = []
        err: list[str] = []
        for line in lines:
            status, resp_body = self._batch_line(line)
            record = {"id": f"batch_req_{uuid.uuid4().hex[:24]}",
                      "custom_id": line.get("custom_id"),
                      "response": {"status_code": status, "request_id": uuid.uuid4().hex,
                                   "body": resp_body}, "error": None}
            (out if status == 200 else err).append(json.dumps(record))
        out_id, err_id = (self._new_file("\n".join(rows).encode() + b"\n", name,
                                         "batch_output")["id"] if rows else None
                          for rows, name in ((out, "output.jsonl"), (err, "errors.jsonl")))
        with self._lock:
            batch.update(status="completed", completed_at=int(time.time()),
                         output_file_id=out_id, error_file_id=err_id, request_counts={
                             "total": len(lines), "completed": len(out), "failed": len(err)})

    def _batch_line(self, line: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            if line.get("method") != "POST" or line.get("url") != "/v1/embeddings":
                raise _bad("Batch lines must POST to /v1/embeddings.", "url")
            req = parse_embedding_request(line.get("body"))
            check_marker(req.inputs, self._faults.bad_input_marker)
        except ApiError as exc:
            return exc.status, exc.body()
        self._record_success(req)
        return 200, embedding_response(req, degraded=self._faults.degraded_models)


def _refusal(window: deque[tuple[float, int]], rpm: int | None, tpm: int | None, tokens: int,
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


def _parse_batch_file(data: bytes) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Parse JSONL and enforce the request/input caps; returns (lines, problem)."""
    try:
        lines = [json.loads(text) for text in data.splitlines() if text.strip()]
    except ValueError:
        lines = [None]
    if not all(isinstance(line, dict) for line in lines):
        return [], {"code": "invalid_json_line", "line": None, "param": None,
                    "message": "Every line must be a JSON object."}
    n_inputs = sum(len(_string_inputs(line.get("body"))) for line in lines)
    if not lines or len(lines) > MAX_BATCH_INPUTS or n_inputs > MAX_BATCH_INPUTS:
        return [], {"code": "too_many_inputs", "line": None, "param": None,
                    "message": f"Batch has {len(lines)} requests and {n_inputs} inputs; "
                    f"between 1 and {MAX_BATCH_INPUTS} are allowed."}
    return lines, None


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw or b"null")
    except ValueError:
        raise _bad("We could not parse the JSON body of your request.") from None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # benchmarks open many connections at once
    app: FakeOpenAIServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that time out and hang up; report real bugs."""
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Thin HTTP adapter around ``FakeOpenAIServer.handle`` (keep-alive capable)."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the access log; request bodies and keys must never be logged."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        # Always drain the body (even for a 401) so keep-alive connections stay in sync.
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        resp = self.server.app.handle(method, self.path.split("?")[0], headers, body)
        self.send_response(resp.status)
        self.send_header("content-type", resp.content_type)
        self.send_header("content-length", str(len(resp.body)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
        for name, value in (resp.headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(resp.body)


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; prints the base_url so scripts can capture it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = FakeOpenAIServer(args.host, args.port, api_key=args.api_key)
    server.set_faults(latency=args.latency)
    server.start()
    print(server.base_url, flush=True)
    while not stop.wait(0.2):
        pass
    server.stop()


if __name__ == "__main__":
    main()
