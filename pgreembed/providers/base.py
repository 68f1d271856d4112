"""The one small interface every embedding provider implements, and its errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np


class ProviderError(Exception):
    """Base class of provider failures (messages never contain the API key)."""


class BadInputError(ProviderError):
    """The provider rejected the request's input (HTTP 400): split the batch to find the row."""


class FatalProviderError(ProviderError):
    """Not the rows' fault and not worth retrying now: bad API key, quota exhausted, bad model."""


class TransientProviderError(ProviderError):
    """Still failing after the retry budget (429s, 5xx, timeouts): try the batch again later."""


class Provider(Protocol):
    """Embeds texts with one model. Implementations are safe to share between threads."""

    model_key: str
    dimensions: int
    max_input_tokens: int
    max_batch_inputs: int
    max_batch_tokens: int

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts (an upper bound is fine when the real tokenizer is unavailable)."""
        ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """`text` cut to at most `max_tokens` tokens."""
        ...

    def embed(self, texts: Sequence[str], tokens: int | None = None) -> np.ndarray:
        """One float32 row per text, in order. Raises ProviderError subclasses.

        `tokens` is the texts' total as `count_tokens` gave it, when the caller has it
        already (a rate-limited provider needs it; counting twice costs ~13% CPU).
        """
        ...
