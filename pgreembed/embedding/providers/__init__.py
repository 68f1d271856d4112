"""Embedding providers behind one interface (see `base.Provider`)."""

from __future__ import annotations

import threading

from pgreembed.config import Settings, Target
from pgreembed.config.model_keys import is_foreign, missing_provider_reason, model_key
from pgreembed.embedding.providers.base import Provider
from pgreembed.embedding.providers.catalog import provider_info
from pgreembed.embedding.providers.keys import has_key, key_missing
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
# provider -> (module, class) of the providers built from a sub-table of settings.
_REMOTE = {"azure": ("azure", "AzureProvider"), "cohere": ("cohere_provider", "CohereProvider"),
           "voyage": ("voyage_provider", "VoyageProvider"),
           "bedrock": ("bedrock", "BedrockProvider"), "gemini": ("google", "GeminiProvider"),
           "vertex": ("google", "VertexProvider")}
_lock = threading.Lock()


def require_credentials(settings: Settings, provider: str) -> None:
    """Before a migration starts: the provider's key is there, or it is a config error
    now (exit 2), not a migration whose every batch fails later in the workers."""
    if provider == "openai" and not settings.openai_api_key and not settings.openai_base_url:
        raise ProviderKeyMissing(OPENAI_KEY_MISSING)
    if is_foreign(provider):
        raise ProviderKeyMissing(f"{provider}: {missing_provider_reason(provider, '?')}")
    info = provider_info(provider)
    if not info.installed:
        raise ProviderKeyMissing(f"the {provider} provider needs the {info.package!r} package:"
                                 f" pip install 'pgreembed[{info.extra}]'")
    if not has_key(provider):
        raise key_missing(provider)


def make_provider(settings: Settings, provider: str, model: str, dimensions: int,
                  target: Target | None = None) -> Provider:
    """The provider for one model, built once per process (clients and sessions are reused).
    `target`: whose provider sub-table (`[target.azure]`, ...) applies; without it, the
    first configured target's that has one."""
    options = _options(settings, provider, target)
    key = f"{model_key(provider, model, dimensions)} {options!r}"
    with _lock:
        found = _providers.get(key)
        if found is None:
            found = _build(settings, provider, model, dimensions, options)
            _providers[key] = found
        return found


def _options(settings: Settings, provider: str, target: Target | None) -> object:
    if target is None or getattr(target.providers, provider, None) is None:
        target = next((t for t in settings.targets.values()
                       if getattr(t.providers, provider, None) is not None), target)
    return target.providers.of(provider) if target is not None else None


def _build(settings: Settings, provider: str, model: str, dimensions: int,
           options: object) -> Provider:
    if is_foreign(provider):  # adopted from pgai: served, never embedded with
        raise ProviderKeyMissing(missing_provider_reason(provider, model))
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
    if provider in _REMOTE:
        import importlib

        from pgreembed.embedding.ratelimit import limiter_for_model

        module_name, class_name = _REMOTE[provider]
        if not provider_info(provider).installed:
            require_credentials(settings, provider)
        module = importlib.import_module(f"pgreembed.embedding.providers.{module_name}")
        built: Provider = getattr(module, class_name).build(
            settings, model, dimensions, options,
            limiter_for_model(settings, provider, model))
        return built
    raise FatalProviderError(f"unknown provider {provider!r}")
