"""OpenAI and any OpenAI-compatible server (vLLM, Ollama, TEI, LiteLLM via base_url).

One retry layer: the client's own retries are off and tenacity retries here,
honouring Retry-After / Retry-After-Ms on 429 and backing off with jitter on
5xx, timeouts and dropped connections. `insufficient_quota`, 400, 401, 403
and 404 are never retried. Vectors come back as base64 (much faster to parse);
the tokens billed are the response's `usage`, so texts are run through tiktoken
only when something needs an exact count before sending.
With a shared `RateLimiter`, every attempt first waits for room in the
budget of the model called (see `pgreembed.embedding.budgets`), and a 429 lowers that
budget for every worker.
"""

from __future__ import annotations

import binascii
import json
import logging
import time
from collections.abc import Sequence

import numpy as np
import openai
import pybase64
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from pgreembed.config.model_keys import is_shortenable, model_key
from pgreembed.embedding.providers import OPENAI_KEY_MISSING
from pgreembed.embedding.providers.base import DOCUMENT, Embeddings, InputType
from pgreembed.embedding.providers.remote import retry_after_seconds as header_retry_after
from pgreembed.embedding.providers.tokens import TokenCounter
from pgreembed.embedding.ratelimit import RateLimiter
from pgreembed.errors import (
    BadInputError,
    FatalProviderError,
    ProviderKeyMissing,
    TransientProviderError,
)
from pgreembed.observability.redact import redact, register_secret
from pgreembed.observability.worker_metrics import observe_provider

log = logging.getLogger(__name__)


def retry_after_seconds(exc: BaseException) -> float | None:
    """The server's requested delay (retry-after-ms or retry-after) of a failed request."""
    response = getattr(exc, "response", None)
    return None if response is None else header_retry_after(response.headers)


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
        self._backoff = wait_exponential_jitter(initial=initial, max=maximum)

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
                 backoff_max: float = 30.0, limiter: RateLimiter | None = None,
                 client: openai.OpenAI | None = None, provider: str = "openai",
                 base_model: str | None = None) -> None:
        """`client`, `provider`, `base_model`: Azure's (pgreembed.embedding.providers.azure):
        its AzureOpenAI client, `model` its deployment, `base_model` the model it serves."""
        if client is None and not api_key and not base_url:
            raise ProviderKeyMissing(OPENAI_KEY_MISSING)
        register_secret(api_key)
        self.model = model
        self.dimensions = dimensions
        self.model_key = model_key(provider, model, dimensions)
        # `dimensions` is accepted only by models trained to be shortened (text-embedding-3,
        # and the test server's fake-* models): a derived migration's later rows need it.
        self._send_dimensions = is_shortenable(base_model or model)
        self._client = client or openai.OpenAI(api_key=api_key or "unused", base_url=base_url,
                                               max_retries=0, timeout=timeout)
        self._tokens = TokenCounter(base_model or model)
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

    @property
    def counts_exactly(self) -> bool:
        return self._tokens.exact

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self._tokens.count(texts)

    def token_bounds(self, texts: Sequence[str]) -> list[int]:
        return self._tokens.bounds(texts)

    def truncate(self, text: str, max_tokens: int) -> str:
        return self._tokens.truncate(text, max_tokens)

    def embed(self, texts: Sequence[str], tokens: int | None = None,
              input_type: InputType = DOCUMENT) -> Embeddings:
        try:
            if self._limiter is not None and self._limiter.limited and tokens is None:
                tokens = sum(self.count_tokens(texts))
            vectors, billed = self._retrying(self._request, list(texts), tokens or 0)
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
        if billed is None:  # a server that does not report usage: count it ourselves
            billed = tokens if tokens is not None else sum(self.count_tokens(texts))
        return Embeddings(vectors, billed)

    def _request(self, texts: list[str], tokens: int) -> tuple[np.ndarray, int | None]:
        body: dict[str, object] = {"input": texts, "model": self.model,
                                   "encoding_format": "base64"}
        if self._send_dimensions:
            body["dimensions"] = self.dimensions
        if self._limiter is not None:
            self._limiter.acquire(tokens)  # sleeps until the request fits the shared budget
        started = time.perf_counter()
        try:
            # The client's generic POST, not `embeddings.create`: create() type-checks each
            # of up to 2048 inputs and builds a pydantic object per vector, which together
            # were over half a worker's CPU. Errors still come back as the SDK's exceptions.
            # Bytes, not text: decoding megabytes of base64 through httpx's incremental
            # text decoder cost more than parsing the JSON (json.loads takes bytes).
            raw = self._client.post("/embeddings", body=body,
                                    cast_to=openai.HttpxBinaryResponseContent).content
        except openai.RateLimitError as exc:
            observe_provider(self.model_key, time.perf_counter() - started, error_label(exc))
            if (self._limiter is not None and self._limiter.limited
                    and not is_quota_error(exc)):
                self._limiter.report_rate_limited()
            raise
        except openai.OpenAIError as exc:
            observe_provider(self.model_key, time.perf_counter() - started, error_label(exc))
            raise
        observe_provider(self.model_key, time.perf_counter() - started)
        return decode_embeddings(raw, len(texts), self.dimensions)


def error_label(exc: BaseException) -> str:
    """A small, fixed set of label values: the HTTP status, or what failed before one."""
    if is_quota_error(exc):
        return "insufficient_quota"
    if isinstance(exc, openai.APIStatusError):
        return str(exc.status_code)
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    return "other"


def decode_embeddings(raw: bytes | str, expected: int, dimensions: int
                      ) -> tuple[np.ndarray, int | None]:
    """The vectors of an embeddings response body, in input order, and its usage.

    A body of the wrong shape is a transient provider fault (a proxy's error page, a
    cut-off response); vectors of the wrong size are returned ragged so that the
    caller records each affected row.
    """
    try:
        body = json.loads(raw)
        items = sorted(body["data"], key=lambda d: d["index"])
        rows = [decode_vector(item["embedding"]) for item in items]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise TransientProviderError(f"provider returned an unreadable body: {exc}") from None
    if len(rows) != expected:
        raise TransientProviderError(
            f"provider returned {len(rows)} embeddings for {expected} inputs")
    usage = body.get("usage")
    billed = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    billed = billed if isinstance(billed, int) and billed > 0 else None
    if any(len(r) != dimensions for r in rows):
        out = np.empty(len(rows), dtype=object)
        out[:] = rows
        return out, billed
    # concatenate, not vstack: vstack's per-array overhead was 8% of the client's CPU.
    return np.concatenate(rows).reshape(len(rows), dimensions), billed


def decode_vector(embedding: object) -> np.ndarray:
    """One `embedding` field: base64 of little-endian float32, or a list of floats."""
    if isinstance(embedding, str):
        # pybase64 (SIMD) decodes ~5x faster than the stdlib: 8 KB of base64 per vector.
        return np.frombuffer(pybase64.b64decode(embedding, validate=True), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)
