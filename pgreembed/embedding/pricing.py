"""List prices of embedding models, for plan estimates, spend caps and the cost metric."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgreembed.embedding.providers.catalog import price_per_mtoken

if TYPE_CHECKING:
    from pgreembed.config import Target

# USD per 1M input tokens of OpenAI's models (every provider's: providers.catalog).
PRICES_PER_MTOKEN = {
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
    "text-embedding-ada-002": 0.10,
}


def list_price(provider: str, model: str, target: Target | None = None) -> float | None:
    """USD per 1M input tokens of `provider`'s `model`; None when no price is known (an
    OpenAI-compatible server's own model, an Azure deployment of an unknown model)."""
    azure = target.providers.azure if target is not None else None
    return price_per_mtoken(provider, model, azure.base_model if azure else None)
