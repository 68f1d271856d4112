"""What every provider reached through its own SDK shares: the one retry layer, the shared
rate limit, the metrics, and the mapping of its errors onto ours.

A provider module says only how to send one request (`_send`) and what an exception of its
client means (`_classify` -> `Fault`). The rest is the openai provider's policy, the same for
all: the client's own retries are off; tenacity retries throttling (waiting what
Retry-After says, else backing off with jitter), 5xx, timeouts and dropped connections;
authentication, permission, quota and a bad model are never retried (fatal: no row is at
fault); a 400 is the input's (`BadInputError`: embed.py splits the request to find the row).
Before each attempt the request waits for room in the model's shared Redis budget, and a
throttle lowers that budget for every worker.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from pgreembed.config.model_keys import model_key
from pgreembed.embedding.providers.base import DOCUMENT, Embeddings, InputType
from pgreembed.embedding.providers.catalog import batch_inputs, provider_info
from pgreembed.embedding.ratelimit import RateLimiter
from pgreembed.errors import BadInputError, FatalProviderError, TransientProviderError
from pgreembed.observability.redact import redact
from pgreembed.observability.worker_metrics import observe_provider

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 120.0
THROTTLED, TRANSIENT, BAD_INPUT, FATAL = "throttled", "transient", "bad_input", "fatal"


@dataclass(frozen=True)
class Fault:
    """What one failed attempt means: its kind, a metric label (the HTTP status, or
    timeout / connection / insufficient_quota), a message, and the server's Retry-After."""

    kind: str
    label: str
    message: str
    retry_after: float | None = None


def http_fault(status: int | None, message: str, headers: Any = None,
               quota: bool = False) -> Fault:
    """The usual meaning of an HTTP status: 429 throttled (quota: fatal), 408/409/5xx
    transient, 400/422 the input's, any other 4xx fatal."""
    text = f"HTTP {status}: {message}" if status else message
    if status == 429:
        if quota:
            return Fault(FATAL, "insufficient_quota", text)
        return Fault(THROTTLED, "429", text, retry_after_seconds(headers))
    if status is None or status >= 500 or status in (408, 409):
        return Fault(TRANSIENT, str(status or "other"), text, retry_after_seconds(headers))
    if status in (400, 413, 422):
        return Fault(BAD_INPUT, str(status), text)
    return Fault(FATAL, str(status), text)


def retry_after_seconds(headers: Any) -> float | None:
    """retry-after-ms or retry-after (seconds) of a response's headers, within bounds."""
    if not headers:
        return None
    lowered = {str(k).lower(): v for k, v in dict(headers).items()}
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lowered.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if 0 <= seconds <= MAX_RETRY_AFTER:
            return seconds
    return None


class _Failed(Exception):
    """One attempt's fault, carried through tenacity."""

    def __init__(self, fault: Fault) -> None:
        super().__init__(fault.message)
        self.fault = fault


class _RetryAfterOrBackoff:
    def __init__(self, initial: float, maximum: float) -> None:
        self._backoff = wait_exponential_jitter(initial=initial, max=maximum)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        seconds = exc.fault.retry_after if isinstance(exc, _Failed) else None
        return seconds if seconds is not None else float(self._backoff(state))


class RemoteProvider(ABC):
    """A provider reached over the network through its SDK (see the module docstring)."""

    provider: ClassVar[str]

    def __init__(self, model: str, dimensions: int, *, timeout: float = 60.0,
                 max_retry_seconds: float = 300.0, limiter: RateLimiter | None = None,
                 max_attempts: int = 8, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0) -> None:
        info = provider_info(self.provider)
        self.model = model
        self.dimensions = dimensions
        self.model_key = model_key(self.provider, model, dimensions)
        self.max_input_tokens = info.input_limit(model)
        self.max_batch_inputs = batch_inputs(self.provider, model)
        self.max_batch_tokens = max(info.max_batch_tokens, self.max_input_tokens)
        self.timeout = timeout
        self.retries = 0
        self._input_types = info.input_types
        self._limiter = limiter
        self._retrying = Retrying(
            retry=retry_if_exception(_retryable),
            wait=_RetryAfterOrBackoff(backoff_initial, backoff_max),
            stop=stop_after_attempt(max_attempts) | stop_after_delay(max_retry_seconds),
            reraise=True, before_sleep=self._log_retry)

    # -- what a provider module implements ---------------------------------------------
    @abstractmethod
    def _send(self, texts: list[str], input_type: InputType
              ) -> tuple[Sequence[Any], int | None]:
        """One request: its vectors in input order and the tokens billed (None: not
        reported). Raises the client's exceptions."""

    @abstractmethod
    def _classify(self, exc: Exception) -> Fault | None:
        """What the client's exception means; None: not the provider's (a bug: raised)."""

    # -- tokens: these models' tokenizers are not available offline ---------------------
    @property
    def counts_exactly(self) -> bool:
        return False

    def token_bounds(self, texts: Sequence[str]) -> list[int]:
        """UTF-8 bytes: no tokenizer makes more tokens than bytes."""
        return [len(t.encode("utf-8")) for t in texts]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """An estimate (a third of the UTF-8 bytes): over the real count for English,
        near it for CJK. The billed count comes from the response where it is reported;
        a text the estimate lets through over the limit is cut by the provider (the
        requests ask it to truncate) or refused as that row's failure."""
        return [max(1, math.ceil(n / 3)) for n in self.token_bounds(texts)]

    def truncate(self, text: str, max_tokens: int) -> str:
        encoded = text.encode("utf-8")
        return encoded[:max_tokens * 3].decode("utf-8", errors="ignore")

    # -- the request -------------------------------------------------------------------
    def wire_input_type(self, input_type: InputType, document: str | None = None) -> str:
        """`input_type` as the provider spells it (`document`: a configured override)."""
        assert self._input_types is not None
        if input_type == DOCUMENT:
            return document or self._input_types[0]
        return self._input_types[1]

    def embed(self, texts: Sequence[str], tokens: int | None = None,
              input_type: InputType = DOCUMENT) -> Embeddings:
        if self._limiter is not None and self._limiter.limited and tokens is None:
            tokens = sum(self.count_tokens(texts))
        try:
            rows, billed = self._retrying(self._attempt, list(texts), tokens or 0, input_type)
        except _Failed as exc:
            fault = exc.fault
            message = redact(fault.message)
            if fault.kind == BAD_INPUT:
                raise BadInputError(message) from None
            if fault.kind == FATAL:
                raise FatalProviderError(message) from None
            raise TransientProviderError(message) from None
        if billed is None:
            billed = tokens if tokens else sum(self.count_tokens(texts))
        return Embeddings(self._matrix(rows, len(texts)), billed)

    def _attempt(self, texts: list[str], tokens: int, input_type: InputType
                 ) -> tuple[Sequence[Any], int | None]:
        if self._limiter is not None:
            self._limiter.acquire(tokens)  # sleeps until the request fits the shared budget
        started = time.perf_counter()
        try:
            rows, billed = self._send(texts, input_type)
        except Exception as exc:  # noqa: BLE001 - classified; not the provider's: re-raised
            fault = self._classify(exc)
            if fault is None:
                raise
            observe_provider(self.model_key, time.perf_counter() - started, fault.label)
            if fault.kind == THROTTLED and self._limiter is not None and self._limiter.limited:
                self._limiter.report_rate_limited(f"provider throttled ({fault.label})")
            raise _Failed(fault) from None
        observe_provider(self.model_key, time.perf_counter() - started)
        return rows, billed

    def _matrix(self, rows: Sequence[Any], expected: int) -> np.ndarray:
        """The vectors as one float32 matrix; ragged (an object array) when some are of
        the wrong size, so that embed.py tells the column's fault from a garbled answer."""
        vectors = [np.asarray(r, dtype=np.float32).ravel() for r in rows]
        if len(vectors) != expected:
            raise TransientProviderError(
                f"provider returned {len(vectors)} embeddings for {expected} inputs")
        if any(v.size != self.dimensions for v in vectors):
            out = np.empty(len(vectors), dtype=object)
            out[:] = vectors
            return out
        if not vectors:
            return np.empty((0, self.dimensions), dtype=np.float32)
        return np.stack(vectors)

    def _log_retry(self, state: RetryCallState) -> None:
        self.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("provider %s: %s; retry %d in %.1fs", self.model_key,
                    redact(str(exc)) if exc else "?", state.attempt_number, delay)


def _retryable(exc: BaseException) -> bool:
    """Throttled and transient faults only."""
    return isinstance(exc, _Failed) and exc.fault.kind in (THROTTLED, TRANSIENT)
