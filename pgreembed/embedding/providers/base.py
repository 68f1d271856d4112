"""The one small interface every embedding provider implements, and its errors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol

if TYPE_CHECKING:  # an annotation only: the CLI and the scheduler import this, no numpy
    import numpy as np

# What a text is embedded as: a row of the table (a document), or a search query. Models
# trained for retrieval (Cohere, Voyage, Gemini, Vertex) embed the two differently; the
# others ignore it. Rows are always documents; `search` and `migrate compare` send queries.
InputType = Literal["document", "query"]
DOCUMENT: InputType = "document"
QUERY: InputType = "query"


class Embeddings(NamedTuple):
    """A request's vectors (one float32 row per text, in order) and the tokens billed."""

    vectors: np.ndarray
    tokens: int  # as the provider reported them (its `usage`), else as counted here


class Provider(Protocol):
    """Embeds texts with one model. Implementations are safe to share between threads."""

    model_key: str
    dimensions: int
    max_input_tokens: int
    max_batch_inputs: int
    max_batch_tokens: int

    @property
    def counts_exactly(self) -> bool:
        """True when `count_tokens` runs the model's tokenizer, not an upper bound."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts (an upper bound is fine when the real tokenizer is unavailable)."""
        ...

    def token_bounds(self, texts: Sequence[str]) -> list[int]:
        """Cheap upper bounds of the token counts: enough to check the limits of most
        texts without running the tokenizer (`count_tokens` settles the rest)."""
        ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """`text` cut to at most `max_tokens` tokens."""
        ...

    def embed(self, texts: Sequence[str], tokens: int | None = None,
              input_type: InputType = DOCUMENT) -> Embeddings:
        """Embed `texts` in one request, as `input_type`. Raises ProviderError subclasses.

        `tokens` is the texts' exact total as `count_tokens` gave it, when the caller has
        it already (a rate-limited provider needs it before sending, and would count).
        """
        ...
