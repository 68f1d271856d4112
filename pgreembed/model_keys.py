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
