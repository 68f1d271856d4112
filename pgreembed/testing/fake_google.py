"""Fakes of Google's embedding APIs for the `google-genai` client: the Gemini API
(POST /{version}/models/{model}:batchEmbedContents, x-goog-api-key) and Vertex AI
(POST /{version}/projects/{p}/locations/{l}/publishers/google/models/{model}:predict or
:batchEmbedContents, a bearer token). Errors are Google's {"error": {code, message, status}}.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from pgreembed.testing.fake_http import Response
from pgreembed.testing.fake_wire import FakeWireServer, WireError, WireRequest, json_answer, loads

_GEMINI = re.compile(r"/v[^/]+/models/([^/:]+):batchEmbedContents")
_VERTEX = re.compile(r"/v[^/]+/projects/[^/]+/locations/[^/]+/publishers/google/models/"
                     r"([^/:]+):(predict|batchEmbedContents)")
_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
           404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL"}


def _text(content: Any) -> str:
    parts = content.get("parts") if isinstance(content, dict) else None
    if not isinstance(parts, list) or not parts or not isinstance(parts[0].get("text"), str):
        raise WireError(400, "content.parts[0].text: expected a string")
    return "".join(p.get("text", "") for p in parts)


class _FakeGoogle(FakeWireServer):
    def error(self, err: WireError) -> Response:
        return json_answer(err.status, {"error": {
            "code": err.status, "message": err.message,
            "status": _STATUS.get(err.status, "INTERNAL")}}, err.headers)

    @staticmethod
    def _batch(model: str, obj: dict[str, Any]) -> WireRequest:
        requests = obj.get("requests")
        if not isinstance(requests, list):
            raise WireError(400, "requests: expected a list")
        texts = [_text(r.get("content")) for r in requests]
        configs = [r.get("embedContentConfig", r) for r in requests]
        kinds = {c.get("taskType") for c in configs}
        dims = {c.get("outputDimensionality") for c in configs}
        if len(kinds) > 1 or len(dims) > 1:
            raise WireError(400, "mixed task types or sizes in one batch")
        return WireRequest(model, texts, kinds.pop() if kinds else None,
                           dims.pop() if dims else None, {"shape": "batch"})

    def render(self, req: WireRequest, vectors: np.ndarray, tokens: int) -> Response:
        if req.extra["shape"] == "batch":
            return json_answer(200, {"embeddings": [{"values": v} for v in vectors.tolist()]})
        per_text = [max(1, round(tokens * len(t) / max(1, sum(map(len, req.texts)))))
                    for t in req.texts]
        return json_answer(200, {
            "predictions": [{"embeddings": {"values": v, "statistics": {
                "token_count": n, "truncated": False}}}
                for v, n in zip(vectors.tolist(), per_text, strict=True)],
            "metadata": {"billableCharacterCount": sum(map(len, req.texts))}})


class FakeGeminiServer(_FakeGoogle):
    name = "gemini"
    max_inputs = 100

    def __init__(self, api_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api_key = api_key

    def parse(self, method: str, path: str, headers: dict[str, str], body: bytes
              ) -> WireRequest | None:
        match = _GEMINI.fullmatch(path)
        if method != "POST" or match is None:
            return None
        if self.api_key and headers.get("x-goog-api-key") != self.api_key:
            raise WireError(400, "API key not valid. Please pass a valid API key.")
        return self._batch(match[1], loads(body))


class FakeVertexServer(_FakeGoogle):
    name = "vertex"
    max_inputs = 250

    def parse(self, method: str, path: str, headers: dict[str, str], body: bytes
              ) -> WireRequest | None:
        match = _VERTEX.fullmatch(path)
        if method != "POST" or match is None:
            return None
        if not headers.get("authorization", "").startswith("Bearer "):
            raise WireError(401, "Request is missing required authentication credential.")
        obj = loads(body)
        if match[2] == "batchEmbedContents":
            return self._batch(match[1], obj)
        instances = obj.get("instances")
        if not isinstance(instances, list) or not all(
                isinstance(i, dict) and isinstance(i.get("content"), str) for i in instances):
            raise WireError(400, "instances: expected [{content: string}]")
        kinds = {i.get("task_type") for i in instances}
        params = obj.get("parameters") or {}
        return WireRequest(match[1], [i["content"] for i in instances],
                           kinds.pop() if len(kinds) == 1 else None,
                           params.get("outputDimensionality"), {"shape": "predict"})
