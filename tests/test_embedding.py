"""Request packing and text sanitising (property-based), bad-row isolation."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgreembed.embedding.embed import embed_rows, pack, sanitize, too_long_advice
from pgreembed.embedding.providers.base import Embeddings
from pgreembed.errors import BadInputError, MisconfiguredError, TransientProviderError
from pgreembed.values import Row


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
        self.counted: list[str] = []  # texts that went through the (costly) exact count
        self.sent_tokens: list[int | None] = []

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        self.counted.extend(texts)
        return [len(t.split()) for t in texts]

    def token_bounds(self, texts: Sequence[str]) -> list[int]:
        return [len(t) for t in texts]  # a word has at least one character

    def truncate(self, text: str, max_tokens: int) -> str:
        return " ".join(text.split()[:max_tokens])

    def embed(self, texts: Sequence[str], tokens: int | None = None) -> Embeddings:
        self.requests.append(len(texts))
        self.sent_tokens.append(tokens)
        if any("bad" in t for t in texts):
            raise BadInputError("HTTP 400: rejected")
        return Embeddings(np.ones((len(texts), 3), dtype=np.float32), 7 * len(texts))


def test_bad_row_is_isolated_by_splitting_and_long_text_truncated_or_failed() -> None:
    provider = SplittingProvider()
    rows = [Row(i, f"text {i}", None) for i in range(10)]
    rows[6] = Row(6, "bad text", None)
    rows[8] = Row(8, "w " * 20, None)
    outcome = embed_rows(rows, provider, truncate=True)
    embedded, failed = outcome.embedded, outcome.failed
    assert sorted(e.row.pk for e in embedded) == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert [(f.row.pk, f.reason) for f in failed] == [
        (6, "provider rejected the text: HTTP 400: rejected")]
    assert next(e for e in embedded if e.row.pk == 8).truncated
    # log2(10) levels of splitting at most, not one request per row
    assert len(provider.requests) <= 8

    outcome = embed_rows([Row(1, "w " * 20, None)], SplittingProvider(), truncate=False)
    assert not outcome.embedded
    assert re.findall(r"over the model's limit of (\d+)", outcome.failed[0].reason) == ["10"]
    assert "set truncate = true" in outcome.failed[0].reason
    # A chunk table is never truncated: its rows are told what fits a chunk instead.
    chunk = embed_rows([Row(1, "w " * 20, None)], SplittingProvider(), truncate=False,
                       advice=too_long_advice(chunked=True))
    assert "truncate" not in chunk.failed[0].reason
    assert "[target.chunking] size" in chunk.failed[0].reason


def test_tokens_are_counted_only_when_the_bounds_cannot_settle_the_limits() -> None:
    provider = SplittingProvider()
    short = [Row(i, f"w{i}", None) for i in range(5)]  # bound 2 chars, under every limit
    outcome = embed_rows(short, provider)
    assert provider.counted == [] and provider.sent_tokens == [None]
    # Billing is what the provider reported, not our bounds (5 x 2 characters).
    assert outcome.tokens == 7 * 5 and len(outcome.embedded) == 5

    provider = SplittingProvider()
    long = Row(9, "a b c d e f", None)  # bound 11 characters > limit 10, but only 6 words
    outcome = embed_rows([*short, long], provider)
    assert len(provider.counted) == 6  # one exact pass over the batch
    assert provider.sent_tokens == [5 + 6]  # exact counts go along (a rate limiter needs them)
    assert not outcome.failed and not any(e.truncated for e in outcome.embedded)


class AnsweringProvider(SplittingProvider):
    """Answers every request with the vectors it was given (as a server might)."""

    def __init__(self, answer: np.ndarray) -> None:
        super().__init__()
        self.answer = answer

    def embed(self, texts: Sequence[str], tokens: int | None = None) -> Embeddings:
        return Embeddings(self.answer, len(texts))


def test_bad_vectors_fail_their_own_row_only() -> None:
    rows = [Row(i, f"text {i}", None) for i in range(3)]
    matrix = np.ones((3, 3), dtype=np.float64)
    matrix[1, 2] = np.nan
    outcome = embed_rows(rows, AnsweringProvider(matrix))
    assert [e.row.pk for e in outcome.embedded] == [0, 2]
    assert all(e.vector.dtype == np.float32 for e in outcome.embedded)
    assert [(f.row.pk, f.reason) for f in outcome.failed] == [
        (1, "provider returned a vector with NaN or infinity")]


def test_wrong_dimensions_are_not_the_rows_fault() -> None:
    """Invariant 8: a probe input alone tells a garbled answer from a misconfigured model."""
    rows = [Row(i, f"text {i}", None) for i in range(3)]
    ragged = np.empty(3, dtype=object)
    ragged[:] = [np.ones(3), np.ones(4), np.ones(3)]
    # The probe alone gets 3 dimensions (the first vector): a garbled answer, retried later.
    with pytest.raises(TransientProviderError, match="vectors of \\[3, 4\\] dimensions"):
        embed_rows(rows, AnsweringProvider(ragged))
    with pytest.raises(MisconfiguredError, match="the model returns 4 dimensions, the column"
                                                 " holds 3") as raised:
        embed_rows(rows, AnsweringProvider(np.ones((3, 4), dtype=np.float32)))
    assert raised.value.tokens == 3 + 1  # the request's and the probe's, as billed
