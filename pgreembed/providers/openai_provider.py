"""OpenAI and any OpenAI-compatible server (vLLM, Ollama, TEI, LiteLLM via base_url).

One retry layer: the client's own retries are off and tenacity retries here,
honouring Retry-After / Retry-After-Ms on 429 and backing off with jitter on
5xx, timeouts and dropped connections. `insufficient_quota`, 400, 401, 403
and 404 are never retried. Vectors come back as base64 (much faster to parse).
With a shared `RateLimiter`, every attempt first waits for room in the
model's budget, and a 429 lowers that budget for every worker.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Sequence

import numpy as np
import openai
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from pgreembed.providers.base import (
    BadInputError,
    FatalProviderError,
    TransientProviderError,
)
from pgreembed.providers.tokens import TokenCounter
from pgreembed.ratelimit import RateLimiter
from pgreembed.redact import redact, register_secret

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 120.0


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's requested delay, from retry-after-ms or retry-after (seconds)."""
    response = getattr(exc, "response", None)
    if response is None:
        return None
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if 0 <= seconds <= MAX_RETRY_AFTER:
            return seconds
    return None


def is_quota_error(exc: BaseException) -> bool:
    return isinstance(exc, openai.RateLimitError) and getattr(exc, "code", None) == (
        "insufficient_quota")


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, openai.RateLimitError):
        return not is_quota_error(exc)
    if isinstance(exc, openai.APITimeoutError | openai.APIConnectionError):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code >= 500 or exc.status_code in (408, 409)
    return False


class _WaitRetryAfterOrBackoff:
    """Wait what Retry-After says; otherwise exponential back-off with jitter."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._backoff = wait_exponential_jitter(multiplier=initial, max=maximum)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        seconds = retry_after_seconds(exc) if exc is not None else None
        return seconds if seconds is not None else float(self._backoff(state))


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    body = getattr(exc, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    text = message or str(exc)
    return redact(f"HTTP {status}: {text}" if status else f"{type(exc).__name__}: {text}")


class OpenAIProvider:
    """Embeddings through the OpenAI client, for OpenAI or a compatible base_url."""

    max_input_tokens = 8192
    max_batch_inputs = 2048
    max_batch_tokens = 300_000

    def __init__(self, model: str, dimensions: int, *, api_key: str | None,
                 base_url: str | None, timeout: float = 60.0, max_attempts: int = 8,
                 max_retry_seconds: float = 300.0, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0, limiter: RateLimiter | None = None) -> None:
        if not api_key and not base_url:
            raise FatalProviderError(
                "OPENAI_API_KEY: not set (needed for the openai provider without OPENAI_BASE_URL)")
        register_secret(api_key)
        self.model = model
        self.dimensions = dimensions
        self.model_key = f"openai:{model}@{dimensions}"
        # `dimensions` is accepted only by text-embedding-3 models (and compatible servers).
        self._send_dimensions = model.startswith("text-embedding-3")
        self._client = openai.OpenAI(api_key=api_key or "unused", base_url=base_url,
                                     max_retries=0, timeout=timeout)
        self._tokens = TokenCounter(model)
        self._retrying = Retrying(
            retry=retry_if_exception(is_retryable),
            wait=_WaitRetryAfterOrBackoff(backoff_initial, backoff_max),
            stop=stop_after_attempt(max_attempts) | stop_after_delay(max_retry_seconds),
            reraise=True,
            before_sleep=self._log_retry,
        )
        self.retries = 0
        self._limiter = limiter

    def _log_retry(self, state: RetryCallState) -> None:
        self.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.warning("provider: %s; retry %d in %.1fs", _describe(exc) if exc else "?",
                    state.attempt_number, delay)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self._tokens.count(texts)

    def truncate(self, text: str, max_tokens: int) -> str:
        return self._tokens.truncate(text, max_tokens)

    def embed(self, texts: Sequence[str], tokens: int | None = None) -> np.ndarray:
        try:
            if self._limiter is not None and tokens is None:
                tokens = sum(self.count_tokens(texts))
            data = self._retrying(self._request, list(texts), tokens or 0)
        except openai.BadRequestError as exc:
            if getattr(exc, "code", None) == "model_not_found":
                raise FatalProviderError(_describe(exc)) from None
            raise BadInputError(_describe(exc)) from None
        except openai.APIStatusError as exc:
            if is_retryable(exc):
                raise TransientProviderError(_describe(exc)) from None
            raise FatalProviderError(_describe(exc)) from None
        except (openai.APITimeoutError, openai.APIConnectionError) as exc:
            raise TransientProviderError(_describe(exc)) from None
        return data

    def _request(self, texts: list[str], tokens: int) -> np.ndarray:
        kwargs: dict[str, object] = {}
        if self._send_dimensions:
            kwargs["dimensions"] = self.dimensions
        if self._limiter is not None:
            self._limiter.acquire(tokens)  # sleeps until the request fits the shared budget
        try:
            # The raw body, not the SDK's pydantic objects: building one model per vector
            # was ~45% of a worker's CPU; json + base64 directly is about twice as fast.
            raw = self._client.embeddings.with_raw_response.create(
                input=texts, model=self.model, encoding_format="base64", **kwargs)  # type: ignore[arg-type]
        except openai.RateLimitError as exc:
            if self._limiter is not None and not is_quota_error(exc):
                self._limiter.report_rate_limited()
            raise
        try:
            items = sorted(json.loads(raw.content)["data"], key=lambda d: d["index"])
        except (ValueError, KeyError, TypeError) as exc:
            raise TransientProviderError(f"provider returned an unreadable body: {exc}") from None
        if len(items) != len(texts):
            raise TransientProviderError(
                f"provider returned {len(items)} embeddings for {len(texts)} inputs")
        rows = [_decode(item["embedding"]) for item in items]
        sizes = {len(r) for r in rows}
        if sizes != {self.dimensions}:
            # Let the caller record each row's wrong size; keep the ragged result as objects.
            out = np.empty(len(rows), dtype=object)
            out[:] = rows
            return out
        return np.vstack(rows)


def _decode(embedding: object) -> np.ndarray:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)
