"""A fake of Bedrock Runtime's InvokeModel (POST /model/{modelId}/invoke), for boto3.

Titan Text Embeddings (v1, v2) and Cohere-on-Bedrock bodies; errors carry the
`x-amzn-ErrorType` header botocore reads the error code from. The request must be signed
(SigV4 Authorization header); the signature itself is not checked.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import numpy as np

from pgreembed.testing.fake_http import Response
from pgreembed.testing.fake_wire import FakeWireServer, WireError, WireRequest, json_answer, loads

_ROUTE = re.compile(r"/model/([^/]+)/invoke")
_CODES = {400: "ValidationException", 403: "AccessDeniedException",
          404: "ResourceNotFoundException", 429: "ThrottlingException",
          500: "InternalServerException"}


class FakeBedrockServer(FakeWireServer):
    name = "bedrock"
    max_inputs = 96  # Cohere on Bedrock; Titan: 1 (checked per body)

    def parse(self, method: str, path: str, headers: dict[str, str], body: bytes
              ) -> WireRequest | None:
        match = _ROUTE.fullmatch(path)
        if method != "POST" or match is None:
            return None
        if not headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 "):
            raise WireError(403, "Missing Authentication Token", "AccessDeniedException")
        model = unquote(match[1])
        obj = loads(body)
        if model.startswith("amazon.titan"):
            text = obj.get("inputText")
            if not isinstance(text, str):
                raise WireError(400, "inputText: expected a string", "ValidationException")
            dims = obj.get("dimensions") if "v2" in model else None
            if dims is not None and dims not in (256, 512, 1024):
                raise WireError(400, "dimensions: must be 256, 512 or 1024",
                                "ValidationException")
            return WireRequest(model, [text], None, dims, {"titan": True})
        if obj.get("input_type") not in ("search_document", "search_query", "classification",
                                         "clustering"):
            raise WireError(400, "input_type: required", "ValidationException")
        texts = obj.get("texts")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise WireError(400, "texts: expected a list of strings", "ValidationException")
        return WireRequest(model, texts, obj["input_type"], None, {"titan": False})

    def render(self, req: WireRequest, vectors: np.ndarray, tokens: int) -> Response:
        headers = {"x-amzn-bedrock-input-token-count": str(tokens)}
        if req.extra["titan"]:
            return json_answer(200, {"embedding": vectors[0].tolist(),
                                     "inputTextTokenCount": tokens}, headers)
        return json_answer(200, {"id": "fake", "response_type": "embeddings_by_type",
                                 "embeddings": {"float": vectors.tolist()},
                                 "texts": req.texts}, headers)

    def error(self, err: WireError) -> Response:
        code = err.code if err.code.endswith("Exception") else _CODES.get(
            err.status, "InternalServerException")
        return json_answer(err.status, {"message": err.message},
                           {**(err.headers or {}), "x-amzn-ErrorType": f"{code}:http://fake/"})
