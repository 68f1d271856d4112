"""Embedding providers behind one interface (see `base.Provider`)."""

from __future__ import annotations

import threading

from pgreembed.config import Settings
from pgreembed.config.model_keys import model_key
from pgreembed.embedding.providers.base import Provider
from pgreembed.errors import (
    BadInputError,
    FatalProviderError,
    ProviderError,
    ProviderKeyMissing,
    TransientProviderError,
)

__all__ = ["BadInputError", "FatalProviderError", "Provider", "ProviderError",
           "TransientProviderError", "make_provider", "require_credentials"]

OPENAI_KEY_MISSING = ("OPENAI_API_KEY: not set (needed for the openai provider without"
                      " OPENAI_BASE_URL)")

_providers: dict[str, Provider] = {}
_lock = threading.Lock()


def require_credentials(settings: Settings, provider: str) -> None:
    """Before a migration starts: the provider's key is there, or it is a config error
    now (exit 2), not a migration whose every batch fails later in the workers."""
    if provider == "openai" and not settings.openai_api_key and not settings.openai_base_url:
        raise ProviderKeyMissing(OPENAI_KEY_MISSING)


def make_provider(settings: Settings, provider: str, model: str, dimensions: int) -> Provider:
    """The provider for one model, built once per process (clients and sessions are reused)."""
    key = model_key(provider, model, dimensions)
    with _lock:
        found = _providers.get(key)
        if found is None:
            found = _build(settings, provider, model, dimensions)
            _providers[key] = found
        return found


def _build(settings: Settings, provider: str, model: str, dimensions: int) -> Provider:
    if provider == "local":
        from pgreembed.embedding.providers.local import LocalMiniLM

        return LocalMiniLM()
    if provider == "openai":
        from pgreembed.embedding.providers.openai_provider import OpenAIProvider
        from pgreembed.embedding.ratelimit import limiter_for_model

        return OpenAIProvider(model, dimensions, api_key=settings.openai_api_key,
                              base_url=settings.openai_base_url,
                              timeout=settings.request_timeout,
                              max_retry_seconds=settings.provider_retry_seconds,
                              limiter=limiter_for_model(settings, provider, model))
    raise FatalProviderError(f"unknown provider {provider!r}")
