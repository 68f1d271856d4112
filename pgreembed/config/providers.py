"""A target's provider sub-tables: `[target.azure]`, `[target.bedrock]`, `[target.cohere]`, ...

Each provider's own settings live in a sub-table of the target (or of `[defaults]`), parsed
here into that provider's frozen dataclass, so config.py only passes the sub-tables through.
A sub-table may be present whatever the target's provider: a migration to that provider
(`migrate start --provider cohere`) finds its settings there. Secrets never come from the
file: keys, Entra ID tokens and AWS credentials come from the environment or the standard
credential chains (see `SECRET_ENV`), and are registered for redaction at start-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pgreembed.config.fields import reject_unknown, typed
from pgreembed.errors import ConfigError

# The providers that have a sub-table (openai: environment only; local: nothing to set).
PROVIDER_TABLES = ("azure", "bedrock", "cohere", "voyage", "gemini", "vertex")

# Environment variables holding provider secrets: masked in every log line and error.
SECRET_ENV = ("AZURE_OPENAI_API_KEY", "AZURE_OPENAI_AD_TOKEN", "CO_API_KEY", "VOYAGE_API_KEY",
              "GEMINI_API_KEY", "GOOGLE_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_BEARER_TOKEN_BEDROCK")


def secrets(env: Mapping[str, str]) -> list[str | None]:
    """The provider secrets the environment holds (registered for redaction at start-up)."""
    return [env.get(name) for name in SECRET_ENV]


@dataclass(frozen=True)
class AzureSettings:
    """`model` of an azure target is its deployment name (key `azure:<deployment>@<dims>`)."""

    endpoint: str | None = None  # else $AZURE_OPENAI_ENDPOINT
    api_version: str | None = None  # else $OPENAI_API_VERSION
    # The OpenAI model the deployment serves: its price, and whether `dimensions` is sent.
    base_model: str | None = None


@dataclass(frozen=True)
class BedrockSettings:
    region: str | None = None  # else the AWS chain ($AWS_REGION, the profile's region)
    endpoint_url: str | None = None  # a VPC endpoint, or a test server
    profile: str | None = None  # a named profile of ~/.aws (else the default chain)


@dataclass(frozen=True)
class CohereSettings:
    base_url: str | None = None  # else $CO_API_URL, else api.cohere.com
    input_type: str = "search_document"  # what rows are sent as (queries: search_query)


@dataclass(frozen=True)
class VoyageSettings:
    base_url: str | None = None  # else api.voyageai.com/v1
    input_type: str = "document"  # what rows are sent as ("none": no prompt; queries: query)


@dataclass(frozen=True)
class GeminiSettings:
    base_url: str | None = None  # else generativelanguage.googleapis.com
    task_type: str = "RETRIEVAL_DOCUMENT"  # what rows are sent as (queries: RETRIEVAL_QUERY)


@dataclass(frozen=True)
class VertexSettings:
    project: str | None = None  # else $GOOGLE_CLOUD_PROJECT
    location: str | None = None  # else $GOOGLE_CLOUD_LOCATION, else us-central1
    base_url: str | None = None  # a private endpoint, or a test server
    task_type: str = "RETRIEVAL_DOCUMENT"


_KINDS: dict[str, type] = {"azure": AzureSettings, "bedrock": BedrockSettings,
                           "cohere": CohereSettings, "voyage": VoyageSettings,
                           "gemini": GeminiSettings, "vertex": VertexSettings}
_CHOICES = {("cohere", "input_type"): ("search_document", "classification", "clustering"),
            ("voyage", "input_type"): ("document", "none"),
            ("gemini", "task_type"): ("RETRIEVAL_DOCUMENT", "SEMANTIC_SIMILARITY",
                                      "CLASSIFICATION", "CLUSTERING"),
            ("vertex", "task_type"): ("RETRIEVAL_DOCUMENT", "SEMANTIC_SIMILARITY",
                                      "CLASSIFICATION", "CLUSTERING")}


@dataclass(frozen=True)
class ProviderSettings:
    """Every provider sub-table of one target (None: not given, the defaults apply)."""

    azure: AzureSettings | None = None
    bedrock: BedrockSettings | None = None
    cohere: CohereSettings | None = None
    voyage: VoyageSettings | None = None
    gemini: GeminiSettings | None = None
    vertex: VertexSettings | None = None

    def of(self, provider: str) -> Any:
        """The settings of `provider` (its defaults when the sub-table is absent)."""
        kind = _KINDS.get(provider)
        if kind is None:
            return None
        return getattr(self, provider) or kind()


def parse_provider_settings(merged: Mapping[str, Any], where: str) -> ProviderSettings:
    """The provider sub-tables of a target (`merged`: the target over `[defaults]`)."""
    parsed: dict[str, Any] = {}
    for name in PROVIDER_TABLES:
        if name not in merged:
            continue
        raw = merged[name]
        at = f"{where}.{name}"
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{at}: must be a table ([target.{name}])")
        kind = _KINDS[name]
        fields = tuple(f.name for f in dataclasses.fields(kind))
        reject_unknown(raw, fields, at)
        values = {key: typed(value, str, f"{at}.{key}") for key, value in raw.items()}
        for key, value in values.items():
            choices = _CHOICES.get((name, key))
            if choices is not None and value not in choices:
                raise ConfigError(f"{at}.{key}: must be one of {choices}, got {value!r}")
        parsed[name] = kind(**values)
    return ProviderSettings(**parsed)
