"""Split a parent's text and format each chunk, exactly as pgai 0.12.1 does.

pgai's worker (pgai/vectorizer/chunking.py, formatting.py) builds langchain-text-splitters'
RecursiveCharacterTextSplitter / CharacterTextSplitter from its settings and formats each
chunk with `string.Template(template).substitute(chunk=chunk, **row)`; the same calls here
give byte-identical chunks with unit "characters" (tests/test_chunking_parity.py). With
unit "tokens" the splitters measure length with the model's own tokenizer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from string import Template
from typing import Any, Protocol

from pgreembed.config.chunking import Chunking

Length = Callable[[str], int]


class Splits(Protocol):
    def split_text(self, text: str) -> list[str]: ...


def make_splitter(chunking: Chunking, length: Length | None = None) -> Callable[[str], list[str]]:
    """A function from a text to its chunks (unformatted). `length` measures a text in
    the configured unit (None: characters, as pgai)."""
    if chunking.splitter == "none":
        return lambda text: [text]
    from langchain_text_splitters import CharacterTextSplitter, RecursiveCharacterTextSplitter

    extra: dict[str, Any] = {} if length is None else {"length_function": length}
    splitter: Splits
    if chunking.splitter == "character":
        splitter = CharacterTextSplitter(
            separator=chunking.separators[0], chunk_size=chunking.size,
            chunk_overlap=chunking.overlap, is_separator_regex=chunking.is_separator_regex,
            **extra)
    else:
        splitter = RecursiveCharacterTextSplitter(
            separators=list(chunking.separators), chunk_size=chunking.size,
            chunk_overlap=chunking.overlap, is_separator_regex=chunking.is_separator_regex,
            **extra)
    return splitter.split_text


def formatter(chunking: Chunking) -> Callable[[str, Mapping[str, Any]], str]:
    """chunk, parent row (template columns) -> the text stored and embedded."""
    if chunking.template == "$chunk":
        return lambda chunk, row: chunk
    template = Template(chunking.template)
    return lambda chunk, row: template.substitute(row, chunk=chunk)


def token_length(provider: str, model: str) -> Length:
    """Length in the model's own tokens: tiktoken for OpenAI models, the local model's
    WordPiece tokenizer (without its two special tokens, which check_fits left room for)."""
    if provider == "openai":
        from pgreembed.embedding.providers.tokens import TokenCounter

        counter = TokenCounter(model)
        return lambda text: counter.count([text])[0]
    return _local_length()


@functools.cache
def _local_length() -> Length:
    from tokenizers import Tokenizer

    from pgreembed.embedding.providers.local import model_files

    tokenizer = Tokenizer.from_file(str(model_files()[1]))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)


def chunker(chunking: Chunking, provider: str, model: str
            ) -> Callable[[str, Mapping[str, Any]], list[str]]:
    """text, parent row -> the formatted chunks, in order (what the chunk table holds)."""
    length = token_length(provider, model) if chunking.unit == "tokens" else None
    split = make_splitter(chunking, length)
    fmt = formatter(chunking)

    def chunks(text: str, row: Mapping[str, Any]) -> list[str]:
        return [fmt(piece, row) for piece in split(text)]
    return chunks
