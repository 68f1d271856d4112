"""Azure OpenAI, Cohere, Voyage and Bedrock (Titan, Cohere on Bedrock) through their official
clients, against local servers speaking each wire protocol over real HTTP.

Per provider: a batch embedded with each row's own vector, within the provider's
inputs-per-request limit; a throttle's Retry-After waited; one refused input failing its
row only; wrong dimensions marking the request's fault (MisconfiguredError); queries sent
as the query input type (also by the search helper, on a real database).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgreembed.config import PROVIDERS, Settings, load_settings, parse_settings
from pgreembed.config.providers import CohereSettings
from pgreembed.embedding import providers
from pgreembed.embedding.embed import Row, embed_rows
from pgreembed.embedding.providers import make_provider
from pgreembed.embedding.providers.base import QUERY, Provider
from pgreembed.embedding.providers.cohere_provider import CohereProvider
from pgreembed.embedding.providers.keys import KEY_VARIABLES
from pgreembed.errors import FatalProviderError, MisconfiguredError, ProviderKeyMissing
from pgreembed.observability.redact import redact
from pgreembed.operations.search import search
from pgreembed.store.setup import init_target
from pgreembed.store.table_lock import LockPolicy
from pgreembed.testing.fake_azure import FakeAzureServer
from pgreembed.testing.fake_bedrock import FakeBedrockServer
from pgreembed.testing.fake_cohere import FakeCohereServer
from pgreembed.testing.fake_google import FakeGeminiServer, FakeVertexServer
from pgreembed.testing.fake_vectors import fake_token_count, fake_vectors
from pgreembed.testing.fake_voyage import FakeVoyageServer
from tests.helpers import ROOT, json_document

KEY = "sk-provider-test-key"


@dataclass(frozen=True)
class Case:
    provider: str
    model: str
    dimensions: int
    server: str
    query_type: str | None  # as the server sees it; None: the API has no input type


CASES = {
    "azure": Case("azure", "fake-512", 512, "azure", None),
    "cohere": Case("cohere", "embed-english-v3.0", 1024, "cohere", "search_query"),
    "voyage": Case("voyage", "voyage-3.5", 512, "voyage", "query"),
    "titan": Case("bedrock", "amazon.titan-embed-text-v2:0", 256, "bedrock", None),
    "bedrock-cohere": Case("bedrock", "cohere.embed-english-v3", 1024, "bedrock",
                           "search_query"),
    "gemini": Case("gemini", "gemini-embedding-001", 768, "gemini", "RETRIEVAL_QUERY"),
    "vertex": Case("vertex", "text-embedding-005", 768, "vertex", "RETRIEVAL_QUERY"),
}
# google-genai is not in the `dev` extra (it pins tenacity < 9.2): its cases need it here.
HAS_GOOGLE = importlib.util.find_spec("google.genai") is not None


def config(servers: dict[str, Any], case: Case) -> dict[str, Any]:
    target = {"name": "docs", "table": "docs", "text_columns": ["title", "body"],
              "vector_column": "embedding", "provider": case.provider, "model": case.model,
              "dimensions": case.dimensions,
              "azure": {"endpoint": servers["azure"].endpoint, "api_version": "2024-10-21",
                        "base_model": "text-embedding-3-small"},
              "cohere": {"base_url": servers["cohere"].base_url},
              "voyage": {"base_url": servers["voyage"].base_url},
              "bedrock": {"region": "us-east-1", "endpoint_url": servers["bedrock"].origin},
              "gemini": {"base_url": servers["gemini"].origin},
              "vertex": {"project": "p", "location": "us-central1",
                         "base_url": servers["vertex"].origin}}
    return {"target": [target], "worker": {"request_timeout": 5.0,
                                           "provider_retry_seconds": 20.0}}


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Any]]:
    running = {"azure": FakeAzureServer(api_key=KEY).start(),
               "cohere": FakeCohereServer(api_key=KEY).start(),
               "voyage": FakeVoyageServer(api_key=KEY).start(),
               "bedrock": FakeBedrockServer().start(),
               "gemini": FakeGeminiServer(api_key=KEY).start(),
               "vertex": FakeVertexServer().start()}
    with pytest.MonkeyPatch.context() as patch:
        for name in ("AZURE_OPENAI_API_KEY", "CO_API_KEY", "VOYAGE_API_KEY", "GEMINI_API_KEY"):
            patch.setenv(name, KEY)
        patch.setenv("AWS_ACCESS_KEY_ID", "AKIDFAKEFORTESTS")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-for-tests")
        patch.delenv("AWS_PROFILE", raising=False)
        yield running
    for server in running.values():
        server.stop()


@pytest.fixture(scope="module")
def module_database(server_dsn: str) -> Iterator[str]:
    """One empty database for the module: the rate limiter reads its (absent) budgets."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    dsn = make_conninfo(server_dsn, dbname=name)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")  # the pool registers its types
    yield dsn
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest, servers: dict[str, Any], module_database: str,
         redis_url: str) -> tuple[Case, Any, Settings, Provider]:
    chosen = CASES[request.param]
    if chosen.server in ("gemini", "vertex") and not HAS_GOOGLE:
        pytest.skip("google-genai is not installed (pip install 'pgreembed[google]')")
    server = servers[chosen.server]
    server.reset()
    # No budget is configured: the rate limiter reads none (a fresh database has no
    # bookkeeping) and sends every request at once.
    settings = parse_settings(config(servers, chosen), {"DATABASE_URL": module_database,
                                                        "REDIS_URL": redis_url})
    providers._providers.clear()  # built once per process: this module's settings
    if chosen.provider == "vertex":  # Application Default Credentials: a token of its own
        from google.oauth2.credentials import Credentials

        from pgreembed.embedding.providers.google import VertexProvider

        vertex = settings.target("docs").providers.vertex
        return chosen, server, settings, VertexProvider(
            chosen.model, chosen.dimensions, options=vertex, timeout=5.0,
            max_retry_seconds=20.0, credentials=Credentials(token="fake-token"))
    provider = make_provider(settings, chosen.provider, chosen.model, chosen.dimensions,
                             settings.target("docs"))
    return chosen, server, settings, provider


def fault(server: Any, kind: str, value: Any) -> None:
    """One fault, by the names of the Azure (OpenAI) fake or the wire fakes."""
    azure = isinstance(server, FakeAzureServer)
    if kind == "throttle":
        server.set_faults(**({"rate_limit_count": 1, "rate_limit_retry_after": value} if azure
                             else {"rate_limit_count": 1, "retry_after": value}))
    else:
        server.set_faults(**{kind: value})


def sizes(server: Any) -> list[int]:
    return list(server.stats().get("request_sizes", []))


def rows(n: int, prefix: str = "text") -> list[Row]:
    return [Row(i, f"{prefix} number {i}", None) for i in range(n)]


def expected(case: Case, texts: list[str]) -> np.ndarray:
    return fake_vectors(case.model, texts, case.dimensions)


def test_batch_is_embedded_within_the_request_limit(case: tuple[Case, Any, Settings, Provider]
                                                    ) -> None:
    chosen, server, _, provider = case
    count = 130 if provider.max_batch_inputs > 1 else 12  # over Cohere's 96; Titan: 1 each
    batch = rows(count)
    outcome = embed_rows(batch, provider)
    assert not outcome.failed
    got = np.stack([e.vector for e in sorted(outcome.embedded, key=lambda e: e.row.pk)])
    assert np.allclose(got, expected(chosen, [r.text or "" for r in batch]), atol=1e-6)
    stats = server.stats()
    assert stats["inputs_embedded"] == count
    # The usage ledger gets the tokens the API billed (Gemini reports none: estimated).
    billed = sum(fake_token_count(r.text or "") for r in batch)
    assert outcome.tokens == billed if chosen.provider != "gemini" else outcome.tokens > 0
    if not isinstance(server, FakeAzureServer):
        assert max(sizes(server)) <= provider.max_batch_inputs
        assert sum(sizes(server)) == count
        assert len(sizes(server)) == -(-count // provider.max_batch_inputs)  # ceil


def test_throttle_waits_its_retry_after(case: tuple[Case, Any, Settings, Provider]) -> None:
    _, server, _, provider = case
    fault(server, "throttle", 0.5)
    started = time.monotonic()
    outcome = embed_rows(rows(1, "throttled"), provider)
    elapsed = time.monotonic() - started
    assert len(outcome.embedded) == 1
    assert server.stats()["status_counts"] == {"429": 1, "200": 1}
    assert elapsed >= 0.5


def test_a_throttle_lowers_the_models_shared_budget(
        case: tuple[Case, Any, Settings, Provider], servers: dict[str, Any],
        module_database: str, redis_url: str) -> None:
    chosen, server, _, _ = case
    document = config(servers, chosen)
    document["rate_limits"] = {chosen.model: {"requests_per_minute": 6000}}
    settings = parse_settings(document, {"DATABASE_URL": module_database,
                                         "REDIS_URL": redis_url})
    providers._providers.clear()
    if chosen.provider == "vertex":
        pytest.skip("built with a token of its own above, without a limiter")
    provider = make_provider(settings, chosen.provider, chosen.model, chosen.dimensions,
                             settings.target("docs"))
    limiter = provider._limiter  # type: ignore[attr-defined]
    assert limiter.limited and limiter.factor() == 1.0
    fault(server, "throttle", 0.1)
    assert len(embed_rows(rows(1, "budget"), provider).embedded) == 1
    assert limiter.factor() == 0.5  # every worker's budget for this model, in Redis


def test_one_refused_input_fails_its_row_only(case: tuple[Case, Any, Settings, Provider]
                                              ) -> None:
    _, server, _, provider = case
    fault(server, "bad_input_marker", "POISON")
    batch = [*rows(6), Row(99, "a POISON text", None), *rows(3, "more")]
    outcome = embed_rows(batch, provider)
    assert [f.row.pk for f in outcome.failed] == [99]
    assert "provider rejected the text" in outcome.failed[0].reason
    assert len(outcome.embedded) == 9


def test_wrong_dimensions_are_the_columns_fault(case: tuple[Case, Any, Settings, Provider]
                                                ) -> None:
    _, server, _, provider = case
    fault(server, "wrong_dims_count", 100)
    with pytest.raises(MisconfiguredError, match="dimensions"):
        embed_rows(rows(4), provider)


def test_every_input_refused_is_the_columns_fault(case: tuple[Case, Any, Settings, Provider]
                                                  ) -> None:
    _, server, _, provider = case
    fault(server, "bad_input_marker", " ")  # every row's text and the one-word probe
    with pytest.raises(MisconfiguredError, match="rejects every input"):
        embed_rows(rows(4), provider)


def test_queries_go_as_the_query_input_type(case: tuple[Case, Any, Settings, Provider]
                                            ) -> None:
    chosen, server, _, provider = case
    if chosen.query_type is None:
        pytest.skip(f"{chosen.provider} {chosen.model} has no input types")
    embed_rows(rows(2), provider)
    provider.embed(["a question?"], input_type=QUERY)
    kinds = server.stats()["input_types"]
    assert kinds[chosen.query_type] == 1
    assert sum(kinds.values()) == 3  # the two rows as documents


@pytest.mark.parametrize("name", ["cohere", "voyage"])
def test_search_helper_sends_a_query(name: str, servers: dict[str, Any], database_url: str,
                                     redis_url: str) -> None:
    chosen = CASES[name]
    server = servers[chosen.server]
    server.reset()
    settings = parse_settings(config(servers, chosen), {"DATABASE_URL": database_url,
                                                        "REDIS_URL": redis_url})
    providers._providers.clear()
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE docs (id bigserial PRIMARY KEY, title text, body text)")
        conn.execute("INSERT INTO docs (title, body) VALUES ('tea', 'green tea brewing')")
    slot = init_target(database_url, settings.target("docs"), LockPolicy(wait_seconds=10))
    vector = fake_vectors(chosen.model, ["tea\ngreen tea brewing"], chosen.dimensions)[0]
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"UPDATE docs SET {slot.vector_column} = %s::vector",
                     ("[" + ",".join(map(str, vector.tolist())) + "]",))
        hits = search(conn, settings, "docs", "how to brew tea")
    assert [hit.key for hit in hits] == [1]
    assert server.stats()["input_types"] == {chosen.query_type: 1}


def test_providers_command_lists_every_provider() -> None:
    result = subprocess.run([sys.executable, "-m", "pgreembed", "providers", "--json"],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json_document(result.stdout)["providers"]}
    assert sorted(listed) == sorted(PROVIDERS)
    assert listed["cohere"]["installed"] and listed["cohere"]["extra"] == "cohere"
    assert listed["cohere"]["input_types"] == {"document": "search_document",
                                               "query": "search_query"}
    titan = next(m for m in listed["bedrock"]["models"]
                 if m["name"] == "amazon.titan-embed-text-v2:0")
    assert (titan["inputs_per_request"], titan["dimensions"]) == (1, [1024, 512, 256])
    text = subprocess.run([sys.executable, "-m", "pgreembed", "providers"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert text.returncode == 0 and "voyage (installed)" in text.stdout
    # A model with its own request size says so (the provider's line said 250 for Vertex).
    assert ("  - gemini-embedding-001: 3072/1536/768 dims, 2,048 tokens an input,"
            " 1 input a request, $0.15 per 1M tokens") in text.stdout.splitlines()


def test_provider_secrets_are_masked_and_never_in_errors(servers: dict[str, Any],
                                                        tmp_path: Any) -> None:
    secret = "co-live-9f8e7d6c5b4a3210"
    path = tmp_path / "pgreembed.toml"
    path.write_text('[[target]]\nname = "docs"\ntable = "docs"\ntext_column = "body"\n'
                    'vector_column = "embedding"\ndimensions = 384\n')
    load_settings(path, {"DATABASE_URL": "postgresql://x/y", "CO_API_KEY": secret,
                         "AWS_SECRET_ACCESS_KEY": "aws/secret+KEY1234567890"})
    assert redact(f"key {secret} and aws/secret+KEY1234567890") == "key *** and ***"
    provider = CohereProvider("embed-english-v3.0", 1024, api_key=secret, timeout=5.0,
                              options=CohereSettings(base_url=servers["cohere"].base_url))
    with pytest.raises(FatalProviderError) as refused:  # the server wants another key
        provider.embed(["text"])
    assert "401" in str(refused.value) and secret not in str(refused.value)


def test_migrate_start_refuses_a_provider_without_its_key(tmp_path: Any) -> None:
    path = tmp_path / "pgreembed.toml"
    path.write_text('[[target]]\nname = "docs"\ntable = "docs"\ntext_column = "body"\n'
                    'vector_column = "embedding"\ndimensions = 384\n')
    env = {k: v for k, v in os.environ.items() if k not in ("CO_API_KEY", "COHERE_API_KEY")}
    result = subprocess.run(
        [sys.executable, "-m", "pgreembed", "--config", str(path), "migrate", "start",
         "--target", "docs", "--provider", "cohere", "--model", "embed-v4.0",
         "--dimensions", "1024"], capture_output=True, text=True, timeout=60,
        env={**env, "PYTHONPATH": str(ROOT), "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"})
    assert result.returncode == 2, result.stderr
    assert "CO_API_KEY or COHERE_API_KEY: not set" in result.stderr


KEYED_MODELS = {"azure": ("text-embedding-3-small", 1536), "cohere": ("embed-v4.0", 1024),
                "voyage": ("voyage-3.5", 1024), "gemini": ("gemini-embedding-001", 768)}


@pytest.mark.parametrize("provider", sorted(KEYED_MODELS))
def test_a_worker_without_the_key_says_what_migrate_start_says(
        provider: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's first build and `migrate start` read the same variables and give the
    same message (they were two lookups with two wordings: "cohere: CO_API_KEY is not set"
    beside "CO_API_KEY or COHERE_API_KEY: not set")."""
    for variable in KEY_VARIABLES[provider]:
        monkeypatch.delenv(variable.name, raising=False)
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", "https://example.invalid")
    settings = parse_settings({"database_url": "postgresql://x/y", "target": [
        {"name": "docs", "table": "docs", "text_column": "body", "vector_column": "embedding",
         "dimensions": 384}]}, {})
    with pytest.raises(ProviderKeyMissing) as at_start:
        providers.require_credentials(settings, provider)
    model, dimensions = KEYED_MODELS[provider]
    with pytest.raises(ProviderKeyMissing) as at_build:
        make_provider(settings, provider, model, dimensions)
    assert str(at_build.value) == str(at_start.value)
    assert str(at_start.value).startswith(" or ".join(v.name for v in KEY_VARIABLES[provider]))
