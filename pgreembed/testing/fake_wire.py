"""Shared machinery of the fake servers of the SDK providers (Cohere, Voyage, Bedrock, Gemini).

Each wire protocol has its own small server class (`fake_cohere`, `fake_voyage`, ...) that
parses its request shape and renders its answers and errors; this base serves them over
real HTTP (fake_http), answers deterministic vectors (fake_vectors: per model and text,
checkable by tests), enforces the protocol's inputs-per-request limit (a 400, as the real
APIs answer), injects faults and counts what it saw (requests, statuses, request sizes,
input types sent).
"""

from __future__ import annotations

import json
import traceback
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np

from pgreembed.embedding.providers.catalog import PROVIDERS
from pgreembed.testing.fake_http import Response, ServedApp
from pgreembed.testing.fake_vectors import fake_token_count, fake_vectors, model_dims


class WireError(Exception):
    """An error answer: status, message, and the protocol's error code (e.g. Throttling)."""

    def __init__(self, status: int, message: str, code: str = "",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers


@dataclass
class WireRequest:
    model: str
    texts: list[str]
    input_type: str | None = None
    dimensions: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # what the renderer needs back


@dataclass
class WireFaults:
    """``*_count``: the next N embedding requests."""

    latency: float = 0.0
    rate_limit_count: int = 0
    retry_after: float = 1.0
    error_500_count: int = 0
    wrong_dims_count: int = 0
    bad_input_marker: str | None = None


class FakeWireServer(ServedApp, ABC):
    """One wire protocol's fake, over real HTTP."""

    name: ClassVar[str]
    max_inputs: ClassVar[int]
    path_prefix: ClassVar[str] = ""  # base_url's path

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.thread_name = f"fake-{self.name}"
        self._faults = WireFaults()
        self._stats = self._empty_stats()

    @property
    def base_url(self) -> str:
        return self.origin + self.path_prefix

    def start(self) -> FakeWireServer:
        super().start()
        return self

    def set_faults(self, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                if not hasattr(self._faults, key):
                    raise ValueError(f"unknown fault field {key!r}")
                setattr(self._faults, key, value)

    def reset(self) -> None:
        with self._lock:
            self._faults = WireFaults()
            self._stats = self._empty_stats()

    @staticmethod
    def _empty_stats() -> dict[str, Any]:
        return {"requests": 0, "status_counts": {}, "inputs_embedded": 0,
                "request_sizes": [], "input_types": {}, "text_counts": {}, "models": {},
                "auth": []}

    # -- what a protocol implements --------------------------------------------------
    @abstractmethod
    def parse(self, method: str, path: str, headers: dict[str, str], body: bytes
              ) -> WireRequest | None:
        """The embedding request of this call (None: not an embedding route: 404)."""

    @abstractmethod
    def render(self, req: WireRequest, vectors: np.ndarray, tokens: int) -> Response:
        """The success answer."""

    @abstractmethod
    def error(self, err: WireError) -> Response:
        """An error answer in the protocol's shape."""

    # -- serving -----------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        if (method, path) == ("GET", "/_stats"):
            return Response(200, json.dumps(self.stats()).encode())
        status = 500
        try:
            req = self.parse(method, path, headers, body)
            if req is None:
                return self.error(WireError(404, f"no route {method} {path}", "NotFound"))
            with self._lock:
                self._stats["requests"] += 1
                self._stats["request_sizes"].append(len(req.texts))
                self._stats["auth"].append(headers.get("authorization", "")[:16])
            resp = self._embed(req)
        except WireError as err:
            resp = self.error(err)
        except Exception:  # a bug here must not look like a network error
            traceback.print_exc()
            resp = self.error(WireError(500, "fake server bug", "InternalServerException"))
        status = resp.status
        with self._lock:
            codes = self._stats["status_counts"]
            codes[str(status)] = codes.get(str(status), 0) + 1
        return resp

    def _embed(self, req: WireRequest) -> Response:
        if self._faults.latency > 0:
            self._stopping.wait(self._faults.latency)
        if self._take("error_500_count"):
            raise WireError(500, "internal error (injected)", "InternalServerException")
        if self._take("rate_limit_count"):
            raise WireError(429, "rate limited (injected)", "ThrottlingException",
                            {"retry-after": f"{self._faults.retry_after:g}"})
        if not req.texts:
            raise WireError(400, "no texts given", "ValidationException")
        if len(req.texts) > self.max_inputs:
            raise WireError(400, f"too many inputs: {len(req.texts)} > {self.max_inputs}",
                            "ValidationException")
        marker = self._faults.bad_input_marker
        if marker and any(marker in t for t in req.texts):
            raise WireError(400, "input rejected (injected)", "ValidationException")
        dims = req.dimensions or native_dims(req.model)
        if self._take("wrong_dims_count"):
            dims += 1
        vectors = fake_vectors(req.model, req.texts, dims)
        tokens = sum(fake_token_count(t) for t in req.texts)
        with self._lock:
            self._stats["inputs_embedded"] += len(req.texts)
            kinds = self._stats["input_types"]
            kinds[str(req.input_type)] = kinds.get(str(req.input_type), 0) + len(req.texts)
            models = self._stats["models"]
            models[req.model] = models.get(req.model, 0) + len(req.texts)
            counts = self._stats["text_counts"]
            for text in req.texts:
                counts[text] = counts.get(text, 0) + 1
        return self.render(req, vectors, tokens)

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return asdict(self._faults)


def native_dims(model: str) -> int:
    """A listed model's default size (providers.catalog), else fake_vectors' rule."""
    for info in PROVIDERS.values():
        found = info.model(model)
        if found is not None:
            return found.dimensions[0]
    return model_dims(model)


def loads(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        raise WireError(400, "body is not JSON", "ValidationException") from None
    if not isinstance(value, dict):
        raise WireError(400, "body is not a JSON object", "ValidationException")
    return value


def json_answer(status: int, obj: object, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(obj).encode(), "application/json", headers)
