"""Deterministic vectors and token counts of the fake provider (tests compare against them)."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

MAX_INPUTS = 2048


MAX_INPUT_TOKENS = 8192


MAX_REQUEST_TOKENS = 300_000


MAX_BATCH_INPUTS = 50_000


DEFAULT_DIMS = 1536


MODEL_DIMS = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}


DIMENSIONS_PREFIXES = ("text-embedding-3", "fake-")


def fake_token_count(text: str) -> int:
    """Cheap, deterministic stand-in for tiktoken (~4 UTF-8 bytes per token)."""
    return max(1, math.ceil(len(text.encode("utf-8")) / 4))


def model_dims(model: str) -> int:
    """Native size of ``model``: known OpenAI names, ``name-<digits>``, else 1536."""
    if model in MODEL_DIMS:
        return MODEL_DIMS[model]
    match = re.search(r"-(\d+)$", model)
    return int(match.group(1)) if match and int(match.group(1)) > 0 else DEFAULT_DIMS


def fake_vectors(model: str, texts: Sequence[str], dims: int) -> npt.NDArray[np.float32]:
    """One unit-norm row per text, from SHAKE-256(model NUL text): stable across processes.

    A shorter vector is the renormalised prefix of a longer one (SHAKE's output
    for fewer bytes is a prefix), like the Matryoshka truncation ``dimensions``
    performs for text-embedding-3 models. Hashing per text but normalising the
    whole matrix at once keeps this server cheap: it shares the benchmark's cores.
    """
    raw = b"".join(hashlib.shake_256(f"{model}\0{text}".encode()).digest(2 * dims)
                   for text in texts)
    matrix = np.frombuffer(raw, dtype="<i2").reshape(len(texts), dims).astype(np.float32)
    matrix += np.float32(0.5)  # never 0
    matrix /= np.sqrt(np.einsum("ij,ij->i", matrix, matrix))[:, None]
    return matrix


def fake_vector(model: str, text: str, dims: int) -> npt.NDArray[np.float32]:
    """The vector this server returns for ``text`` (see `fake_vectors`)."""
    return fake_vectors(model, [text], dims)[0]


def model_vectors(model: str, texts: Sequence[str], dims: int,
                  degraded: dict[str, dict[str, Any]] | None = None
                  ) -> npt.NDArray[np.float32]:
    """`fake_vectors`, or for a degraded model its base model's plus fresh noise."""
    spec = (degraded or {}).get(model)
    if spec is None:
        return fake_vectors(model, texts, dims)
    matrix = fake_vectors(spec["copy_of"], texts, dims)
    if spec["noise"] > 0:
        noise = np.random.default_rng().standard_normal(matrix.shape).astype(np.float32)
        matrix = matrix + noise * np.float32(spec["noise"] / math.sqrt(dims))
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix
