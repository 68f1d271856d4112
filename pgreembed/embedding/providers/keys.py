"""Which environment variables hold each remote provider's key, looked up in one place.

`require_credentials` (before a migration starts) and each provider's `build` (when a
worker first needs it) ask the same question; one lookup gives one answer and one message.
Bedrock and Vertex use the AWS / Google credential chains, which find credentials in many
places: not listed, not checked here.
"""

from __future__ import annotations

from pgreembed.config import environment
from pgreembed.config.environment import EnvVar
from pgreembed.errors import ProviderKeyMissing

KEY_VARIABLES: dict[str, tuple[EnvVar, ...]] = {
    "azure": (environment.AZURE_OPENAI_API_KEY, environment.AZURE_OPENAI_AD_TOKEN),
    "cohere": (environment.CO_API_KEY, environment.COHERE_API_KEY),
    "voyage": (environment.VOYAGE_API_KEY,),
    "gemini": (environment.GEMINI_API_KEY, environment.GOOGLE_API_KEY),
}


def key_missing(provider: str) -> ProviderKeyMissing:
    """The one message for a provider whose key variables are all unset."""
    names = " or ".join(each.name for each in KEY_VARIABLES[provider])
    return ProviderKeyMissing(f"{names}: not set (needed for the {provider} provider)")


def has_key(provider: str) -> bool:
    """True when the provider needs no key variable or one of them is set."""
    variables = KEY_VARIABLES.get(provider)
    return not variables or any(each.is_set() for each in variables)


def provider_key(provider: str) -> str:
    """The provider's key: the first of its variables that is set, in the table's order."""
    for variable in KEY_VARIABLES[provider]:
        value = variable.get()
        if value:
            return value
    raise key_missing(provider)
