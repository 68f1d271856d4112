"""Google's embeddings through the official `google-genai` client: the Gemini API
(`gemini`, an API key) and Vertex AI (`vertex`, a project and location, Application Default
Credentials).

Rows go as task type RETRIEVAL_DOCUMENT (or the target's `task_type`), queries as
RETRIEVAL_QUERY; `output_dimensionality` is sent for the models that take it. Gemini API:
models/{model}:batchEmbedContents, up to 100 texts a request, usage not reported (tokens
are estimated). Vertex AI: text-embedding-* through :predict (up to 250 texts, token counts
in each prediction's statistics), gemini-embedding-001 one text a request. The client's own
retries are off (its default); remote.py retries 429 RESOURCE_EXHAUSTED (Retry-After
honoured), 5xx and timeouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx
from google import genai
from google.genai import errors as gerr
from google.genai import types

from pgreembed.config import Settings, environment
from pgreembed.config.providers import GeminiSettings, VertexSettings
from pgreembed.embedding.providers.base import InputType
from pgreembed.embedding.providers.catalog import shortenable
from pgreembed.embedding.providers.keys import provider_key
from pgreembed.embedding.providers.remote import TRANSIENT, Fault, RemoteProvider, http_fault
from pgreembed.embedding.ratelimit import RateLimiter
from pgreembed.errors import ProviderKeyMissing
from pgreembed.observability.redact import register_secret


class _GoogleProvider(RemoteProvider):
    """What Gemini and Vertex share: the request and the error mapping."""

    _client: genai.Client
    _task_type: str

    def _http_options(self, base_url: str | None) -> types.HttpOptions:
        return types.HttpOptions(base_url=base_url, timeout=int(self.timeout * 1000),
                                 retry_options=types.HttpRetryOptions(attempts=1))

    def _send(self, texts: list[str], input_type: InputType
              ) -> tuple[Sequence[Any], int | None]:
        config = types.EmbedContentConfig(
            task_type=self.wire_input_type(input_type, self._task_type),
            output_dimensionality=self.dimensions if shortenable(self.provider, self.model)
            else None)
        contents: list[Any] = list(texts)  # list invariance: list[str] is not list[Part]
        response = self._client.models.embed_content(model=self.model, contents=contents,
                                                     config=config)
        embeddings = response.embeddings or []
        counted = [e.statistics.token_count for e in embeddings
                   if e.statistics is not None and e.statistics.token_count]
        billed = int(sum(counted)) if len(counted) == len(embeddings) and counted else None
        return [e.values or [] for e in embeddings], billed

    def _classify(self, exc: Exception) -> Fault | None:
        if isinstance(exc, gerr.APIError):
            headers = getattr(exc.response, "headers", None)
            return http_fault(exc.code, f"{exc.status}: {exc.message}", headers)
        if isinstance(exc, httpx.TimeoutException):
            return Fault(TRANSIENT, "timeout", f"timeout: {type(exc).__name__}")
        if isinstance(exc, httpx.TransportError):
            return Fault(TRANSIENT, "connection", f"connection: {type(exc).__name__}")
        return None


class GeminiProvider(_GoogleProvider):
    provider = "gemini"

    def __init__(self, model: str, dimensions: int, *, api_key: str,
                 options: GeminiSettings | None = None, **kwargs: Any) -> None:
        super().__init__(model, dimensions, **kwargs)
        options = options or GeminiSettings()
        register_secret(api_key)
        self._task_type = options.task_type
        self._client = genai.Client(api_key=api_key,
                                    http_options=self._http_options(options.base_url))

    @classmethod
    def build(cls, settings: Settings, model: str, dimensions: int, options: object,
              limiter: RateLimiter) -> GeminiProvider:
        return cls(model, dimensions, api_key=provider_key("gemini"),
                   options=options if isinstance(options, GeminiSettings) else None,
                   timeout=settings.request_timeout,
                   max_retry_seconds=settings.provider_retry_seconds, limiter=limiter)


class VertexProvider(_GoogleProvider):
    provider = "vertex"

    def __init__(self, model: str, dimensions: int, *, options: VertexSettings | None = None,
                 credentials: Any = None, **kwargs: Any) -> None:
        """`credentials`: google.auth credentials (default: Application Default
        Credentials, found by the client)."""
        super().__init__(model, dimensions, **kwargs)
        options = options or VertexSettings()
        project = options.project or environment.GOOGLE_CLOUD_PROJECT.get()
        if not project:
            raise ProviderKeyMissing("vertex: set [target.vertex] project (or"
                                     " GOOGLE_CLOUD_PROJECT)")
        self._task_type = options.task_type
        self._client = genai.Client(
            vertexai=True, project=project, credentials=credentials,
            location=options.location or environment.GOOGLE_CLOUD_LOCATION.get()
            or "us-central1", http_options=self._http_options(options.base_url))

    @classmethod
    def build(cls, settings: Settings, model: str, dimensions: int, options: object,
              limiter: RateLimiter) -> VertexProvider:
        return cls(model, dimensions,
                   options=options if isinstance(options, VertexSettings) else None,
                   timeout=settings.request_timeout,
                   max_retry_seconds=settings.provider_retry_seconds, limiter=limiter)
