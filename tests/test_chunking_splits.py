"""Chunked targets' config and splits: identical to pgai 0.12.1's own chunker code."""

from __future__ import annotations

from typing import Any

import pytest

from pgreembed.chunking.splitter import chunker, make_splitter
from pgreembed.config import parse_settings
from pgreembed.config.chunking import INPUT_LIMITS, Chunking, Parent
from pgreembed.embedding.providers.catalog import provider_info
from pgreembed.errors import ConfigError
from tests.chunk_corpus import documents

ENV = {"DATABASE_URL": "postgresql:///x"}


def chunked(chunking: dict[str, Any] | None = None, **extra: Any) -> Any:
    target: dict[str, Any] = {"name": "docs", "table": "app.docs", "text_column": "body",
                              "vector_column": "embedding", "dimensions": 8,
                              "provider": "openai", "model": "text-embedding-3-small",
                              "chunking": chunking or {}, **extra}
    return parse_settings({"target": [target]}, ENV).target("docs")


def test_a_chunked_target_is_its_chunk_table_with_pgai_defaults() -> None:
    t = chunked()
    assert (t.schema, t.table, t.text_columns, t.primary_key, t.truncate) == (
        "app", "docs_chunks", ("chunk",), "embedding_uuid", False)
    assert isinstance(t.parent, Parent)
    assert (t.parent.schema, t.parent.table, t.parent.text_columns) == ("app", "docs", ("body",))
    assert t.parent.chunking == Chunking(
        splitter="recursive", unit="characters", size=800, overlap=400,
        separators=("\n\n", "\n", ".", "?", "!", " ", ""), is_separator_regex=False,
        template="$chunk")
    assert chunked(destination={"table": "pieces"}).table == "pieces"
    assert chunked(destination={"view": "docs_view"}).parent.view == "docs_view"
    with pytest.raises(ConfigError, match="three different names"):
        chunked(destination={"view": "docs_chunks"})
    assert chunked({"splitter": "character"}).parent.chunking.separators == ("\n\n",)


def test_two_targets_never_share_a_chunk_table_or_a_vector_column() -> None:
    """A second chunked target on the same parent (another text) defaulted to the same
    chunk table, and each one's pass deleted the other's chunks as stale (a probe saw a
    body's chunks replaced by the title's); two targets on one vector column overwrite
    each other's vectors. Refused when the config is read."""
    base = {"table": "app.docs", "vector_column": "embedding", "dimensions": 8,
            "provider": "openai", "model": "text-embedding-3-small"}
    body = {"name": "docs", "text_column": "body", "chunking": {}, **base}
    title = {"name": "titles", "text_column": "title", "chunking": {}, **base}
    with pytest.raises(ConfigError, match="both keep their chunks in app.docs_chunks"):
        parse_settings({"target": [body, title]}, ENV)
    apart = parse_settings({"target": [body, {**title, "destination": {
        "table": "title_chunks", "view": "title_view"}}]}, ENV)
    assert [t.table for t in apart.targets.values()] == ["docs_chunks", "title_chunks"]
    plain = {k: v for k, v in title.items() if k != "chunking"}
    with pytest.raises(ConfigError, match="both write app.docs.embedding"):
        parse_settings({"target": [plain, {**plain, "name": "again"}]}, ENV)
    assert parse_settings({"target": [plain, {**plain, "name": "again",
                                              "vector_column": "other"}]}, ENV)


@pytest.mark.parametrize(("chunking", "message"), [
    ({"overlap": 800}, "overlap: must be at least 0 and less than size (800), got 800"),
    ({"splitter": "semantic"}, "splitter: must be one of"),
    ({"unit": "words"}, "unit: must be one of"),
    ({"size": 9000}, "can exceed the openai model's input limit of 8192 tokens"),
    ({"size": 8190, "template": "title: $title\n$chunk"}, "use size <= 8184"),
    ({"template": "$title"}, "template: must contain $chunk"),
    ({"template": "$chunk $"}, "template: not a valid template"),
    ({"splitter": "character", "separators": ["\n\n", "\n"]}, "takes exactly one separator"),
    ({"colour": 1}, "unknown field(s) colour"),
])
def test_refused_settings_name_the_field(chunking: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        chunked(chunking)
    assert message in str(error.value)


def test_local_model_limit_refuses_pgai_default_size() -> None:
    with pytest.raises(ConfigError, match="local model's input limit of 254 tokens"):
        parse_settings({"target": [{"name": "docs", "table": "docs", "text_column": "body",
                                    "vector_column": "e", "dimensions": 384,
                                    "chunking": {}}]}, ENV)


def test_input_limits_agree_with_the_providers() -> None:
    from pgreembed.embedding.providers import local, openai_provider

    assert INPUT_LIMITS["local"] == local.MAX_TOKENS - 2
    assert INPUT_LIMITS["openai"] == openai_provider.OpenAIProvider.max_input_tokens
    assert INPUT_LIMITS["azure"] == provider_info("azure").max_input_tokens


@pytest.mark.parametrize(("provider", "model"), [
    ("azure", "my-deployment"), ("cohere", "embed-v4.0"), ("voyage", "voyage-3.5"),
    ("bedrock", "amazon.titan-embed-text-v2:0"), ("gemini", "gemini-embedding-001"),
    ("vertex", "text-embedding-005")])
def test_every_provider_takes_a_chunked_target(provider: str, model: str) -> None:
    """Was KeyError: 'cohere' at config load (only openai and local had a limit)."""
    t = chunked(provider=provider, model=model)
    assert (t.provider, t.model, t.parent.chunking.size) == (provider, model, 800)


SETTINGS = [
    Chunking(),  # pgai's default: recursive 800/400
    Chunking(size=200, overlap=50),
    Chunking(size=1000, overlap=0, separators=(r"\n\s*\n", r"(?<=[.!?]) ", " ", ""),
             is_separator_regex=True),
    Chunking(splitter="character", size=800, overlap=400, separators=("\n\n",)),
    Chunking(splitter="character", size=300, overlap=100, separators=("\n",)),
]


def _pgai_chunker(chunking: Chunking) -> Any:
    from pgai.vectorizer.chunking import (
        LangChainCharacterTextSplitter,
        LangChainRecursiveCharacterTextSplitter,
    )

    common = {"chunk_size": chunking.size, "chunk_overlap": chunking.overlap,
              "is_separator_regex": chunking.is_separator_regex}
    if chunking.splitter == "character":
        return LangChainCharacterTextSplitter(implementation="character_text_splitter",
                                              separator=chunking.separators[0], **common)
    return LangChainRecursiveCharacterTextSplitter(
        implementation="recursive_character_text_splitter",
        separators=list(chunking.separators), **common)


@pytest.mark.parametrize("chunking", SETTINGS, ids=lambda c: f"{c.splitter}-{c.size}")
def test_splits_identical_to_pgai_on_1000_documents(chunking: Chunking) -> None:
    pgai = _pgai_chunker(chunking)
    ours = make_splitter(chunking)
    docs = documents(1000)
    splits = [ours(doc) for doc in docs]
    differing = [i for i, doc in enumerate(docs) if splits[i] != pgai.into_chunks({}, doc)]
    assert sum(map(len, splits)) > 3000  # the corpus really is split into many chunks
    assert differing == []


def test_template_formats_as_pgai() -> None:
    from pgai.vectorizer.formatting import PythonTemplate

    template = "title: $title by ${author} ($$) $chunk"
    ours = chunker(Chunking(size=300, overlap=0, template=template), "openai", "m")
    pgai_format = PythonTemplate(implementation="python_template", template=template)
    pgai = _pgai_chunker(Chunking(size=300, overlap=0))
    for i, doc in enumerate(documents(200, seed=7)):
        row = {"title": f"T{i}", "author": None if i % 3 else i}
        assert ours(doc, row) == [pgai_format.format(c, row) for c in pgai.into_chunks(row, doc)]
