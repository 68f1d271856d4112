"""What pgreembed knows about each provider: its extra, wire format, request limits, models.

Batching uses the limits (`embed.pack`: inputs and tokens per request, tokens per input);
`pgreembed providers` prints them; prices (USD per 1M input tokens, list prices) feed the
plan's estimate, spend caps and the cost metric. A model not listed here still works: it
gets its provider's default limits and no price (a spend cap then cannot be enforced).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    dimensions: tuple[int, ...]  # the sizes it can answer; the first is its default
    max_input_tokens: int
    price_per_mtoken: float | None = None
    shortenable: bool = False  # takes a dimensions parameter (output_dimension, ...)


@dataclass(frozen=True)
class ProviderInfo:
    name: str
    extra: str | None  # pip install 'pgreembed[<extra>]'
    package: str | None  # the import its client needs
    wire: str
    max_batch_inputs: int
    max_batch_tokens: int
    max_input_tokens: int  # of models not listed
    input_types: tuple[str, str] | None  # (document, query) as sent; None: not sent
    models: tuple[ModelInfo, ...] = ()

    @property
    def installed(self) -> bool:
        return self.package is None or importlib.util.find_spec(self.package) is not None

    def model(self, name: str) -> ModelInfo | None:
        return next((m for m in self.models if m.name == name), None)

    def input_limit(self, model: str) -> int:
        found = self.model(model)
        return found.max_input_tokens if found else self.max_input_tokens


_OPENAI_MODELS = (
    ModelInfo("text-embedding-3-small", (1536,), 8192, 0.02, True),
    ModelInfo("text-embedding-3-large", (3072,), 8192, 0.13, True),
    ModelInfo("text-embedding-ada-002", (1536,), 8192, 0.10),
)

PROVIDERS: dict[str, ProviderInfo] = {p.name: p for p in (
    ProviderInfo("local", "local", "onnxruntime", "in-process ONNX (no network)", 256,
                 256 * 256, 256, None,
                 (ModelInfo("all-MiniLM-L6-v2-onnx-int8", (384,), 256, 0.0),)),
    ProviderInfo("openai", None, "openai", "OpenAI /v1/embeddings (and compatible servers)",
                 2048, 300_000, 8192, None, _OPENAI_MODELS),
    ProviderInfo("azure", None, "openai",
                 "Azure OpenAI /openai/deployments/{deployment}/embeddings?api-version=",
                 2048, 300_000, 8192, None, _OPENAI_MODELS),
    ProviderInfo("cohere", "cohere", "cohere", "Cohere v2 /v2/embed", 96, 96 * 512, 512,
                 ("search_document", "search_query"), (
                     ModelInfo("embed-v4.0", (1536, 1024, 512, 256), 128_000, 0.12, True),
                     ModelInfo("embed-english-v3.0", (1024,), 512, 0.10),
                     ModelInfo("embed-multilingual-v3.0", (1024,), 512, 0.10),
                     ModelInfo("embed-english-light-v3.0", (384,), 512, 0.10),
                     ModelInfo("embed-multilingual-light-v3.0", (384,), 512, 0.10))),
    ProviderInfo("voyage", "voyage", "voyageai", "Voyage /v1/embeddings", 1000, 120_000,
                 32_000, ("document", "query"), (
                     ModelInfo("voyage-3.5", (1024, 256, 512, 2048), 32_000, 0.06, True),
                     ModelInfo("voyage-3.5-lite", (1024, 256, 512, 2048), 32_000, 0.02, True),
                     ModelInfo("voyage-3-large", (1024, 256, 512, 2048), 32_000, 0.18, True),
                     ModelInfo("voyage-code-3", (1024, 256, 512, 2048), 32_000, 0.18, True))),
    # Titan takes one text per InvokeModel call; Cohere on Bedrock up to 96.
    ProviderInfo("bedrock", "bedrock", "boto3",
                 "Bedrock Runtime InvokeModel /model/{modelId}/invoke (SigV4)", 1, 8192,
                 8192, ("search_document", "search_query"), (
                     ModelInfo("amazon.titan-embed-text-v2:0", (1024, 512, 256), 8192, 0.02,
                               True),
                     ModelInfo("amazon.titan-embed-text-v1", (1536,), 8192, 0.10),
                     ModelInfo("cohere.embed-english-v3", (1024,), 512, 0.10),
                     ModelInfo("cohere.embed-multilingual-v3", (1024,), 512, 0.10))),
    ProviderInfo("gemini", "google", "google.genai",
                 "Gemini API models/{model}:batchEmbedContents", 100, 100 * 2048, 2048,
                 ("RETRIEVAL_DOCUMENT", "RETRIEVAL_QUERY"), (
                     ModelInfo("gemini-embedding-001", (3072, 1536, 768), 2048, 0.15, True),
                     ModelInfo("text-embedding-004", (768,), 2048, 0.0, True))),
    ProviderInfo("vertex", "google", "google.genai",
                 "Vertex AI publishers/google/models/{model}:predict (or :embedContent)", 250,
                 20_000, 2048, ("RETRIEVAL_DOCUMENT", "RETRIEVAL_QUERY"), (
                     ModelInfo("gemini-embedding-001", (3072, 1536, 768), 2048, 0.15, True),
                     ModelInfo("text-embedding-005", (768,), 2048, None, True),
                     ModelInfo("text-multilingual-embedding-002", (768,), 2048, None, True))),
)}

# Models whose requests hold one input only, whatever their provider's maximum.
SINGLE_INPUT_MODELS = ("amazon.titan-embed-text-v2:0", "amazon.titan-embed-text-v1")
BEDROCK_COHERE_INPUTS = 96


def provider_info(name: str) -> ProviderInfo:
    return PROVIDERS[name]


def batch_inputs(provider: str, model: str) -> int:
    """Inputs one request of `model` may hold."""
    if model in SINGLE_INPUT_MODELS or model.startswith("amazon.titan"):
        return 1
    if provider == "bedrock":
        return BEDROCK_COHERE_INPUTS
    if provider == "vertex" and model.startswith("gemini-embedding"):
        return 1  # Vertex serves gemini-embedding-001 one content per request
    return PROVIDERS[provider].max_batch_inputs


def price_per_mtoken(provider: str, model: str, base_model: str | None = None) -> float | None:
    """List price of `model` (USD per 1M input tokens); None when unknown. An Azure
    deployment is priced as the model it serves (`base_model`, else its own name)."""
    info = PROVIDERS.get(provider)
    if info is None:
        return None
    found = info.model(base_model or model) if provider == "azure" else info.model(model)
    return None if found is None else found.price_per_mtoken


def shortenable(provider: str, model: str, base_model: str | None = None) -> bool:
    """Whether the provider is sent the column's size (else it answers its default)."""
    info = PROVIDERS.get(provider)
    found = info.model(base_model or model) if info else None
    return bool(found and found.shortenable)
