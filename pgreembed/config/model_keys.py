"""The model key, `<provider>:<model>@<dimensions>`: what identifies "the same model" for
invariant 4. Built and parsed only here (the registry, providers, plan and metrics use it)."""

from __future__ import annotations


def model_key(provider: str, model: str, dimensions: int) -> str:
    return f"{provider}:{model}@{dimensions}"


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
