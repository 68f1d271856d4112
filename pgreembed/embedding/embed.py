"""Turning rows' texts into vectors: sanitise, check limits, pack requests, isolate bad rows.

Every row ends as exactly one of: an `Embedded` vector, or a `Failed` with a
reason a person can act on. A bad row never fails its neighbours: a 400 on a
request is split in halves until the offending row stands alone.

A fault of the request is not its rows' (invariant 8): at the first 400 or
vector of the wrong size in a batch, one short plain input (`PROBE`) is sent
alone. If it is rejected too, or comes back with the wrong size, the model or
the config is at fault (`dimensions` over the model's maximum, a model that is
not the one configured): `MisconfiguredError`, and no row is failed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pgreembed.embedding.providers.base import DOCUMENT, InputType, Provider
from pgreembed.errors import BadInputError, MisconfiguredError, TransientProviderError
from pgreembed.store.texts import is_no_text
from pgreembed.values import Embedded, Failed, Row

log = logging.getLogger(__name__)

NOT_FINITE = "provider returned a vector with NaN or infinity"
# Short and plain: no provider can reject it for its content or its length.
PROBE = "hello world"


@dataclass
class Outcome:
    """What became of a batch's rows, and the tokens the provider billed for them."""

    embedded: list[Embedded] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    tokens: int = 0


def sanitize(text: str) -> str:
    """Text a JSON API accepts: no NUL bytes, no lone surrogates."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def estimate_tokens(provider: Provider, rows: Sequence[Row]) -> int:
    """What sending `rows` will cost at most: their token counts, cut at the input limit."""
    texts = [r.text for r in rows if r.text is not None and not is_no_text(r.text)]
    if not texts:
        return 0
    return sum(min(n, provider.max_input_tokens) for n in provider.count_tokens(texts))


TRUNCATE_ADVICE = "set truncate = true to cut it"
# A chunk table is never truncated (its text is a chunk the splitter sized, plus the
# template's parent columns): the way out is in [target.chunking].
CHUNK_ADVICE = ("a chunk with its template's columns; shorten what the template adds, or"
                " lower [target.chunking] size")


def too_long_advice(chunked: bool) -> str:
    """What a row whose text is over the model's input limit is told to do."""
    return CHUNK_ADVICE if chunked else TRUNCATE_ADVICE


def prepare(rows: Sequence[Row], provider: Provider, truncate: bool,
            advice: str = TRUNCATE_ADVICE
            ) -> tuple[list[tuple[Row, str, int, bool]], list[Failed], bool]:
    """Validate texts: (row, text to send, tokens, truncated) or a recorded failure.

    Token counts are the provider's cheap upper bounds when those settle both limits
    (each text, and the whole batch in one request), else exact counts; the flag
    says which, since a rate limiter needs exact counts.
    """
    ready: list[tuple[Row, str, int, bool]] = []
    failed: list[Failed] = []
    candidates: list[tuple[Row, str]] = []
    for row in rows:
        if row.text is None:
            failed.append(Failed(row, "text is NULL"))
            continue
        text = sanitize(row.text)
        if is_no_text(text):
            failed.append(Failed(row, "text is empty or only whitespace"))
            continue
        candidates.append((row, text))
    texts = [t for _, t in candidates]
    limit = provider.max_input_tokens
    counts, exact = (provider.token_bounds(texts) if texts else []), False
    if texts and (max(counts) > limit or sum(counts) > provider.max_batch_tokens):
        counts, exact = provider.count_tokens(texts), True  # bounds too loose to decide
    for (row, text), tokens in zip(candidates, counts, strict=True):
        if tokens <= limit:
            ready.append((row, text, tokens, False))
        elif truncate:
            cut = provider.truncate(text, limit)
            ready.append((row, cut, min(tokens, limit), True))
        else:
            failed.append(Failed(row, f"text has {tokens} tokens, over the model's limit of"
                                      f" {limit} ({advice})"))
    return ready, failed, exact


def pack(items: Sequence[tuple[Row, str, int, bool]], max_inputs: int, max_tokens: int
         ) -> Iterator[list[tuple[Row, str, int, bool]]]:
    """Consecutive requests within both caps (inputs per request, tokens per request)."""
    batch: list[tuple[Row, str, int, bool]] = []
    tokens = 0
    for item in items:
        if batch and (len(batch) >= max_inputs or tokens + item[2] > max_tokens):
            yield batch
            batch, tokens = [], 0
        batch.append(item)
        tokens += item[2]
    if batch:
        yield batch


def embed_rows(rows: Sequence[Row], provider: Provider, truncate: bool = True,
               input_type: InputType = DOCUMENT, advice: str = TRUNCATE_ADVICE) -> Outcome:
    """Embed what can be embedded; explain what cannot. Transient errors propagate, and
    `MisconfiguredError` when the request, not a row, is at fault. `input_type`: rows are
    documents; `migrate compare` embeds its texts as the queries they stand for."""
    ready, failed, exact = prepare(rows, provider, truncate, advice)
    outcome = Outcome(failed=failed)
    probe = _Probe(provider, outcome, input_type)
    for request in pack(ready, provider.max_batch_inputs, provider.max_batch_tokens):
        _embed_isolating(request, provider, exact, outcome, probe)
    return outcome


class _Probe:
    """Tells a request's fault from its rows': sends `PROBE` alone, once per batch."""

    def __init__(self, provider: Provider, outcome: Outcome, input_type: InputType) -> None:
        self.provider = provider
        self.outcome = outcome
        # Passed only when not the default: providers of before input types still plug in.
        self.kind: dict[str, Any] = {} if input_type == DOCUMENT else {
            "input_type": input_type}
        self.passed = False

    def check(self, complaint: str) -> None:
        """Raise MisconfiguredError unless a plain input alone is embedded as expected."""
        if self.passed:
            return
        expected = self.provider.dimensions
        try:
            vectors, billed = self.provider.embed([PROBE], **self.kind)
        except BadInputError as exc:
            raise MisconfiguredError(
                f"the provider rejects every input, even a one-word one ({exc}); no row is"
                f" at fault: check the model, dimensions and base URL",
                self.outcome.tokens) from None
        self.outcome.tokens += billed
        size = np.asarray(vectors[0]).size
        if size != expected:
            raise MisconfiguredError(
                f"the model returns {size} dimensions, the column holds {expected}: check"
                " the model and dimensions (a model change is a migration)",
                self.outcome.tokens)
        self.passed = True
        log.info("%s, but a probe input alone is fine: the rows are looked at", complaint)


def _embed_isolating(request: list[tuple[Row, str, int, bool]], provider: Provider,
                     exact: bool, outcome: Outcome, probe: _Probe) -> None:
    try:
        vectors, billed = provider.embed(
            [text for _, text, _, _ in request],
            sum(tokens for _, _, tokens, _ in request) if exact else None,
            **probe.kind)
    except BadInputError as exc:
        probe.check(f"provider rejected a request of {len(request)} inputs")
        if len(request) == 1:
            outcome.failed.append(Failed(request[0][0], f"provider rejected the text: {exc}"))
            return
        middle = len(request) // 2
        log.info("provider rejected a request of %d inputs; splitting to find the bad row",
                 len(request))
        _embed_isolating(request[:middle], provider, exact, outcome, probe)
        _embed_isolating(request[middle:], provider, exact, outcome, probe)
        return
    outcome.tokens += billed
    if vectors.ndim != 2 or vectors.shape[1] != provider.dimensions:
        sizes = sorted({np.asarray(v).size for v in vectors})
        probe.check(f"provider returned vectors of {sizes} dimensions")
        # The model answers the right size when asked alone: this answer was garbled.
        raise TransientProviderError(
            f"provider returned vectors of {sizes} dimensions for a request, expected"
            f" {provider.dimensions}; retrying the batch later")
    vectors = np.asarray(vectors, dtype=np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    for (row, _, _, truncated), vector, ok in zip(request, vectors, finite, strict=True):
        if ok:
            outcome.embedded.append(Embedded(row, vector, truncated))
        else:
            outcome.failed.append(Failed(row, NOT_FINITE))
