"""Request packing and text sanitising (property-based), bad-row isolation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pgreembed.embedding import Row, embed_rows, pack, sanitize
from pgreembed.providers.base import BadInputError


@given(st.lists(st.integers(min_value=1, max_value=500), max_size=300),
       st.integers(min_value=1, max_value=64), st.integers(min_value=500, max_value=5000))
def test_pack_respects_both_caps_and_keeps_order(tokens: list[int], max_inputs: int,
                                                 max_tokens: int) -> None:
    items = [(Row(i, "x", None), "x", t, False) for i, t in enumerate(tokens)]
    batches = list(pack(items, max_inputs, max_tokens))
    assert [item for batch in batches for item in batch] == items
    for batch in batches:
        assert 1 <= len(batch) <= max_inputs
        assert sum(i[2] for i in batch) <= max_tokens or len(batch) == 1
    # Greedy: a batch was closed only because the next item did not fit.
    for batch, following in zip(batches, batches[1:], strict=False):
        assert (len(batch) == max_inputs
                or sum(i[2] for i in batch) + following[0][2] > max_tokens)


@given(st.text())
def test_sanitize_gives_encodable_text_without_nul(text: str) -> None:
    cleaned = sanitize(text)
    cleaned.encode("utf-8")  # never raises
    assert "\x00" not in cleaned
    if "\x00" not in text and all(not 0xD800 <= ord(c) <= 0xDFFF for c in text):
        assert cleaned == text


class SplittingProvider:
    """A provider whose server rejects any request containing 'bad' (like a 400)."""

    model_key = "test:split@3"
    dimensions = 3
    max_input_tokens = 10
    max_batch_inputs = 16
    max_batch_tokens = 1000

    def __init__(self) -> None:
        self.requests: list[int] = []

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def truncate(self, text: str, max_tokens: int) -> str:
        return " ".join(text.split()[:max_tokens])

    def embed(self, texts: Sequence[str], tokens: int | None = None) -> np.ndarray:
        self.requests.append(len(texts))
        if any("bad" in t for t in texts):
            raise BadInputError("HTTP 400: rejected")
        return np.ones((len(texts), 3), dtype=np.float32)


def test_bad_row_is_isolated_by_splitting_and_long_text_truncated_or_failed() -> None:
    provider = SplittingProvider()
    rows = [Row(i, f"text {i}", None) for i in range(10)]
    rows[6] = Row(6, "bad text", None)
    rows[8] = Row(8, "w " * 20, None)
    embedded, failed = embed_rows(rows, provider, truncate=True)
    assert sorted(e.row.pk for e in embedded) == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert [(f.row.pk, f.reason) for f in failed] == [
        (6, "provider rejected the text: HTTP 400: rejected")]
    assert next(e for e in embedded if e.row.pk == 8).truncated
    # log2(10) levels of splitting at most, not one request per row
    assert len(provider.requests) <= 8

    embedded, failed = embed_rows([Row(1, "w " * 20, None)], SplittingProvider(),
                                  truncate=False)
    assert not embedded and "over the model's limit of 10" in failed[0].reason
