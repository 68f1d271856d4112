"""Cohere's v2 embed API through the official `cohere` client (ClientV2).

`input_type` is required by the API: rows go as `search_document` (or the target's
`[target.cohere] input_type`), the search helper's and `migrate compare`'s queries as
`search_query`. Up to 96 texts a request; over-long texts are cut by the API
(`truncate=END`). The tokens billed are the response's `meta.billed_units.input_tokens`.
The client's own retries are off: remote.py retries (429 with Retry-After, 5xx, timeouts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cohere
import httpx
from cohere.core.api_error import ApiError

from pgreembed.config import Settings, environment
from pgreembed.config.providers import CohereSettings
from pgreembed.embedding.providers.base import InputType
from pgreembed.embedding.providers.catalog import shortenable
from pgreembed.embedding.providers.keys import provider_key
from pgreembed.embedding.providers.remote import TRANSIENT, Fault, RemoteProvider, http_fault
from pgreembed.embedding.ratelimit import RateLimiter
from pgreembed.observability.redact import register_secret


class CohereProvider(RemoteProvider):
    provider = "cohere"

    def __init__(self, model: str, dimensions: int, *, api_key: str,
                 options: CohereSettings | None = None, **kwargs: Any) -> None:
        super().__init__(model, dimensions, **kwargs)
        self._options = options or CohereSettings()
        register_secret(api_key)
        self._client = cohere.ClientV2(
            api_key=api_key, base_url=self._options.base_url or environment.CO_API_URL.get(),
            timeout=self.timeout, max_retries=0)
        self._send_dimensions = shortenable(self.provider, model)

    @classmethod
    def build(cls, settings: Settings, model: str, dimensions: int, options: object,
              limiter: RateLimiter) -> CohereProvider:
        return cls(model, dimensions, api_key=provider_key("cohere"),
                   options=options if isinstance(options, CohereSettings) else None,
                   timeout=settings.request_timeout,
                   max_retry_seconds=settings.provider_retry_seconds, limiter=limiter)

    def _send(self, texts: list[str], input_type: InputType
              ) -> tuple[Sequence[Any], int | None]:
        extra: dict[str, Any] = {}
        if self._send_dimensions:
            extra["output_dimension"] = self.dimensions
        response = self._client.embed(
            model=self.model, texts=texts,
            input_type=self.wire_input_type(input_type, self._options.input_type),
            embedding_types=["float"], truncate="END",
            request_options={"max_retries": 0, "timeout_in_seconds": int(self.timeout)},
            **extra)
        rows = response.embeddings.float_ or []
        billed = None
        units = response.meta.billed_units if response.meta else None
        if units is not None and units.input_tokens:
            billed = int(units.input_tokens)
        return rows, billed

    def _classify(self, exc: Exception) -> Fault | None:
        if isinstance(exc, ApiError):
            body = exc.body
            message = body.get("message") if isinstance(body, dict) else None
            text = str(message or body or type(exc).__name__)
            return http_fault(exc.status_code, text, exc.headers,
                              quota=exc.status_code == 429 and "quota" in text.lower())
        if isinstance(exc, httpx.TimeoutException):
            return Fault(TRANSIENT, "timeout", f"timeout: {exc}")
        if isinstance(exc, httpx.TransportError):
            return Fault(TRANSIENT, "connection", f"connection: {type(exc).__name__}")
        return None
