"""List prices of embedding models, for plan estimates, spend caps and the cost metric."""

from __future__ import annotations

# USD per 1M input tokens, for plan's estimate (unknown models: no estimate).
PRICES_PER_MTOKEN = {
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
    "text-embedding-ada-002": 0.10,
}
