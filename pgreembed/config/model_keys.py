"""The model key, `<provider>:<model>@<dimensions>`: what identifies "the same model" for
invariant 4. Built and parsed only here (the registry, providers, plan and metrics use it)."""

from __future__ import annotations


def model_key(provider: str, model: str, dimensions: int) -> str:
    return f"{provider}:{model}@{dimensions}"


# A provider pgreembed lacks (pgai's `embedding_litellm`, or any implementation it does not
# know), adopted from pgai: its vectors are served and counted, nothing is embedded with it.
# Its provider name carries this prefix, which no provider pgreembed builds has, so its key
# (`pgai-litellm:cohere/embed-english-v3.0@1024`) never equals a real model's key, also
# once a provider of the same name exists (its vectors were never checked against it).
FOREIGN_PREFIX = "pgai-"


def foreign_provider(implementation: str) -> str:
    """The provider name of pgai's embedding implementation `implementation` (no ':')."""
    safe = "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in implementation)
    return FOREIGN_PREFIX + (safe or "unknown")


def is_foreign(provider: str) -> bool:
    return provider.startswith(FOREIGN_PREFIX)


def missing_provider_reason(provider: str, model: str) -> str:
    """The reason recorded (status, doctor, the worker) for a foreign target's column."""
    implementation = provider[len(FOREIGN_PREFIX):]
    return (f"provider {implementation!r} (pgai's embedding_{implementation}, model {model!r})"
            " is not in pgreembed yet: the adopted vectors are served and counted, nothing is"
            " embedded for this column (new and edited texts stay pending, not failed);"
            " pgai's worker keeps serving the vectorizer")


def parse_model_key(key: str) -> tuple[str, str, int]:
    """(provider, model, dimensions) of a key `model_key` built."""
    provider, rest = key.split(":", 1)
    model, dimensions = rest.rsplit("@", 1)
    return provider, model, int(dimensions)


# Models trained so that their first D components, renormalised, are their D-dimension
# vector (the API's `dimensions` parameter): OpenAI's text-embedding-3-*, and the local
# test server's fake-* models, which follow the same rule (pgreembed.testing.fake_vectors).
SHORTENABLE_PREFIXES = ("text-embedding-3-", "fake-")


def is_shortenable(model: str) -> bool:
    """Whether `model` takes `dimensions` and a derived migration may shorten its vectors."""
    return model.startswith(SHORTENABLE_PREFIXES)
