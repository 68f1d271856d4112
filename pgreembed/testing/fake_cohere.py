"""A fake of Cohere's v2 embed API (POST /v2/embed), for the official `cohere` client."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from pgreembed.testing.fake_http import Response
from pgreembed.testing.fake_wire import FakeWireServer, WireError, WireRequest, json_answer, loads

INPUT_TYPES = ("search_document", "search_query", "classification", "clustering", "image")


class FakeCohereServer(FakeWireServer):
    name = "cohere"
    max_inputs = 96

    def __init__(self, api_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api_key = api_key

    def parse(self, method: str, path: str, headers: dict[str, str], body: bytes
              ) -> WireRequest | None:
        if (method, path) != ("POST", "/v2/embed"):
            return None
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            raise WireError(401, "invalid api token")
        obj = loads(body)
        if obj.get("input_type") not in INPUT_TYPES:
            raise WireError(400, f"invalid request: input_type must be one of {INPUT_TYPES}")
        texts = obj.get("texts")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise WireError(400, "invalid request: texts must be a list of strings")
        return WireRequest(str(obj.get("model")), texts, obj["input_type"],
                           obj.get("output_dimension"))

    def render(self, req: WireRequest, vectors: np.ndarray, tokens: int) -> Response:
        return json_answer(200, {
            "id": str(uuid.uuid4()), "response_type": "embeddings_by_type",
            "embeddings": {"float": vectors.tolist()}, "texts": req.texts,
            "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}}})

    def error(self, err: WireError) -> Response:
        return json_answer(err.status, {"id": str(uuid.uuid4()), "message": err.message},
                           err.headers)
