"""Voyage AI embeddings through the official `voyageai` client.

Rows go as input_type `document` (or none: `[target.voyage] input_type = "none"`), queries
as `query`. Up to 1000 texts a request; over-long texts are cut by the API
(`truncation=True`); models of the 3.5 family take `output_dimension`. The tokens billed are
the response's `usage.total_tokens`. The client's own retries are off (max_retries=0):
remote.py retries 429 (with Retry-After), 5xx and timeouts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import voyageai
import voyageai.error as verr

from pgreembed.config import Settings
from pgreembed.config.providers import VoyageSettings
from pgreembed.embedding.providers.base import InputType
from pgreembed.embedding.providers.catalog import shortenable
from pgreembed.embedding.providers.keys import provider_key
from pgreembed.embedding.providers.remote import TRANSIENT, Fault, RemoteProvider, http_fault
from pgreembed.embedding.ratelimit import RateLimiter
from pgreembed.observability.redact import register_secret


class VoyageProvider(RemoteProvider):
    provider = "voyage"

    def __init__(self, model: str, dimensions: int, *, api_key: str,
                 options: VoyageSettings | None = None, **kwargs: Any) -> None:
        super().__init__(model, dimensions, **kwargs)
        self._options = options or VoyageSettings()
        register_secret(api_key)
        self._client = voyageai.Client(api_key=api_key, max_retries=0, timeout=self.timeout,
                                       base_url=self._options.base_url)
        self._send_dimensions = shortenable(self.provider, model)

    @classmethod
    def build(cls, settings: Settings, model: str, dimensions: int, options: object,
              limiter: RateLimiter) -> VoyageProvider:
        return cls(model, dimensions, api_key=provider_key("voyage"),
                   options=options if isinstance(options, VoyageSettings) else None,
                   timeout=settings.request_timeout,
                   max_retry_seconds=settings.provider_retry_seconds, limiter=limiter)

    def _send(self, texts: list[str], input_type: InputType
              ) -> tuple[Sequence[Any], int | None]:
        kind: str | None = self.wire_input_type(input_type, self._options.input_type)
        response = self._client.embed(
            texts, model=self.model, input_type=None if kind == "none" else kind,
            truncation=True, output_dimension=self.dimensions if self._send_dimensions else None)
        return response.embeddings, int(response.total_tokens) or None

    def _classify(self, exc: Exception) -> Fault | None:
        if isinstance(exc, verr.Timeout):
            return Fault(TRANSIENT, "timeout", f"timeout: {exc.user_message}")
        if isinstance(exc, verr.APIConnectionError):
            return Fault(TRANSIENT, "connection", f"connection: {exc.user_message}")
        if isinstance(exc, verr.VoyageError):
            status = exc.http_status
            text = str(exc.user_message or type(exc).__name__)
            if isinstance(exc, verr.APIError) and exc.json_body:
                detail = exc.json_body.get("detail") if isinstance(exc.json_body, dict) else None
                text = str(detail or text)
            return http_fault(status, text, exc.headers)
        return None
