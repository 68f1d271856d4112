"""A fake of Voyage AI's embeddings API (POST /v1/embeddings), for the `voyageai` client."""

from __future__ import annotations

from typing import Any

import numpy as np

from pgreembed.testing.fake_http import Response
from pgreembed.testing.fake_wire import FakeWireServer, WireError, WireRequest, json_answer, loads


class FakeVoyageServer(FakeWireServer):
    name = "voyage"
    max_inputs = 1000
    path_prefix = "/v1"

    def __init__(self, api_key: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.api_key = api_key

    def parse(self, method: str, path: str, headers: dict[str, str], body: bytes
              ) -> WireRequest | None:
        if (method, path) != ("POST", "/v1/embeddings"):
            return None
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            raise WireError(401, "Provided API key is invalid.")
        obj = loads(body)
        texts = obj.get("input")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise WireError(400, "input must be a string or a list of strings")
        if obj.get("input_type") not in (None, "document", "query"):
            raise WireError(400, "input_type must be null, 'document' or 'query'")
        return WireRequest(str(obj.get("model")), texts, obj.get("input_type"),
                           obj.get("output_dimension"))

    def render(self, req: WireRequest, vectors: np.ndarray, tokens: int) -> Response:
        return json_answer(200, {
            "object": "list", "model": req.model, "usage": {"total_tokens": tokens},
            "data": [{"object": "embedding", "embedding": v, "index": i}
                     for i, v in enumerate(vectors.tolist())]})

    def error(self, err: WireError) -> Response:
        return json_answer(err.status, {"detail": err.message}, err.headers)
