"""Azure OpenAI: the openai provider with the `openai` package's own AzureOpenAI client.

The wire format, errors (429 + Retry-After, 5xx, `insufficient_quota`), retry layer and
vector decoding are OpenAI's, so this is `OpenAIProvider` with another client: requests go
to {endpoint}/openai/deployments/{deployment}/embeddings?api-version=..., authenticated by
an `api-key` header ($AZURE_OPENAI_API_KEY) or a Microsoft Entra ID bearer token
($AZURE_OPENAI_AD_TOKEN). The target's `model` is the deployment's name, so its model key is
`azure:<deployment>@<dims>`; `[target.azure] base_model` names the model it serves (price,
and whether `dimensions` is sent).
"""

from __future__ import annotations

import openai

from pgreembed.config import Settings, environment
from pgreembed.config.providers import AzureSettings
from pgreembed.embedding.providers.keys import has_key, key_missing
from pgreembed.embedding.providers.openai_provider import OpenAIProvider
from pgreembed.embedding.ratelimit import RateLimiter
from pgreembed.errors import ProviderKeyMissing
from pgreembed.observability.redact import register_secret

DEFAULT_API_VERSION = "2024-10-21"  # the GA version that takes `dimensions`


class AzureProvider(OpenAIProvider):
    """Embeddings of one Azure OpenAI deployment."""

    @classmethod
    def build(cls, settings: Settings, model: str, dimensions: int, options: object,
              limiter: RateLimiter) -> AzureProvider:
        azure = options if isinstance(options, AzureSettings) else AzureSettings()
        endpoint = azure.endpoint or environment.AZURE_OPENAI_ENDPOINT.get()
        if not endpoint:
            raise ProviderKeyMissing("azure: set [target.azure] endpoint (or"
                                     " AZURE_OPENAI_ENDPOINT)")
        if not has_key("azure"):
            raise key_missing("azure")
        key = environment.AZURE_OPENAI_API_KEY.get()
        token = environment.AZURE_OPENAI_AD_TOKEN.get()
        register_secret(key)
        register_secret(token)
        client = openai.AzureOpenAI(
            azure_endpoint=endpoint, api_key=key, azure_ad_token=None if key else token,
            api_version=(azure.api_version or environment.OPENAI_API_VERSION.get()
                         or DEFAULT_API_VERSION),
            max_retries=0, timeout=settings.request_timeout)
        return cls(model, dimensions, api_key=None, base_url=None,
                   timeout=settings.request_timeout,
                   max_retry_seconds=settings.provider_retry_seconds, limiter=limiter,
                   client=client, provider="azure", base_model=azure.base_model)
