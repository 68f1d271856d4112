"""The fake OpenAI server answering Azure OpenAI's URL shape as well, for `openai.AzureOpenAI`.

POST /openai/deployments/{deployment}/embeddings?api-version=... with an `api-key` header (or
an Entra ID bearer token) is served as /v1/embeddings of model {deployment}: same faults,
counters and vectors as FakeOpenAIServer (fake_openai).
"""

from __future__ import annotations

import json
import re
from urllib.parse import unquote

from pgreembed.testing.fake_http import Response
from pgreembed.testing.fake_openai import FakeOpenAIServer

_ROUTE = re.compile(r"/openai/deployments/([^/]+)/embeddings")


class FakeAzureServer(FakeOpenAIServer):
    @property
    def endpoint(self) -> str:
        """What `[target.azure] endpoint` names (the client appends /openai/...)."""
        return self.base_url.removesuffix("/v1")

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        match = _ROUTE.fullmatch(path)
        if method == "POST" and match is not None:
            key = headers.get("api-key")
            if key is not None:
                headers = {**headers, "authorization": f"Bearer {key}"}
            try:
                obj = json.loads(body)
                obj["model"] = unquote(match[1])  # the deployment names the model
                body = json.dumps(obj).encode()
            except (ValueError, TypeError):
                pass  # the OpenAI fake answers the 400
            path = "/v1/embeddings"
        return super().handle(method, path, headers, body)
