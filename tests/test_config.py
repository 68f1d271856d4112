"""Configuration validation: every error names the field and what is wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgreembed.config import parse_settings
from pgreembed.errors import ConfigError
from tests.helpers import ROOT, docs_config

ENV = {"DATABASE_URL": "postgresql:///x"}


def target(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "docs", "table": "docs", "text_column": "body",
                               "vector_column": "embedding", "dimensions": 384}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def settings(*targets: dict[str, object], env: dict[str, str] = ENV, **extra: object):  # type: ignore[no-untyped-def]
    return parse_settings({"target": list(targets), **extra}, env)


def test_minimal_target_gets_sane_defaults() -> None:
    s = settings(target())
    t = s.target("docs")
    assert (t.schema, t.table, t.text_columns) == ("public", "docs", ("body",))
    assert t.provider == "local" and t.model_key == "local:all-MiniLM-L6-v2-onnx-int8@384"
    assert s.redis_url == "redis://127.0.0.1:6379/0"


@pytest.mark.parametrize(("overrides", "message"), [
    ({"dimensions": "many"}, "target 'docs'.dimensions: must be an integer, got 'many'"),
    ({"dimensions": 0}, "target 'docs'.dimensions: must be > 0"),
    ({"dimensions": None}, "target 'docs': missing required field 'dimensions'"),
    ({"name": "Docs-1"}, "name must match"),
    ({"provider": "anthropic"}, "target 'docs'.provider: must be one of"),
    ({"provider": "cohere", "model": "embed-v4.0", "cohere": {"input_type": "search_query"}},
     "target 'docs'.cohere.input_type: must be one of"),
    ({"azure": {"endpoint": "https://x", "deployment": "d"}},
     "target 'docs'.azure: unknown field(s) deployment"),
    ({"provider": "local", "dimensions": 768}, "produces 384, got 768"),
    ({"batch_size": 5000}, "target 'docs'.batch_size: must be <= 2048"),
    ({"text_column": None}, "missing required field 'text_column'"),
    ({"text_column": None, "text_columns": []}, "text_columns: must be a non-empty list"),
    ({"trigger": "yes"}, "target 'docs'.trigger: must be a bool"),
    ({"colour": "blue"}, "unknown field(s) colour"),
    ({"distance": "hamming"}, "target 'docs'.distance: must be one of cosine, l2, ip, l1"),
    ({"vector_column": " "}, "target 'docs'.vector_column: must not be empty"),
])
def test_errors_name_field_and_reason(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings(target(**overrides))
    assert message in str(error.value)


def test_database_url_required_and_targets_unique() -> None:
    with pytest.raises(ConfigError, match="DATABASE_URL: not set"):
        settings(target(), env={})
    with pytest.raises(ConfigError, match="declared twice"):
        settings(target(), target())
    with pytest.raises(ConfigError, match="at least one"):
        parse_settings({}, ENV)


def test_a_redis_url_without_its_scheme_is_named_and_not_echoed() -> None:
    for url in ("127.0.0.1:6379", "http://:hunter2pw@redis:6379/0"):
        with pytest.raises(ConfigError, match="REDIS_URL: must be a redis://") as error:
            settings(target(), env={**ENV, "REDIS_URL": url})
        assert "hunter2pw" not in str(error.value)
    assert settings(target(), env={**ENV, "REDIS_URL": "rediss://h:6380/1"}).redis_url


def test_unknown_target_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown target 'nope' \(configured: docs\)"):
        settings(target()).target("nope")


def test_worker_section_validated() -> None:
    with pytest.raises(ConfigError, match="worker.poll_interval: must be > 0"):
        settings(target(), worker={"poll_interval": 0})


def test_non_utf8_config_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes(docs_config().replace('"docs"', '"docs"  # caf\xe9', 1)
                       .encode("latin-1"))
    env = {**os.environ, "DATABASE_URL": "postgresql:///x", "PGREEMBED_CONFIG": str(config),
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "pgreembed", "status"], env=env,
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"config file {str(config)!r}: not UTF-8" in result.stderr


@pytest.mark.parametrize(("overrides", "schema", "table"), [
    ({"table": "docs"}, "public", "docs"),
    ({"table": "app.docs"}, "app", "docs"),
    ({"table": '"my.schema"."my.table"'}, "my.schema", "my.table"),
    ({"table": 'app."my.table"'}, "app", "my.table"),
    ({"table": '"say ""hi"""'}, "public", 'say "hi"'),
    ({"table": 'we"ird; --'}, "public", 'we"ird; --'),
    ({"schema": "my.schema", "table": "my.table"}, "my.schema", "my.table"),
])
def test_table_names_with_dots(overrides: dict[str, object], schema: str, table: str) -> None:
    t = settings(target(**overrides)).target("docs")
    assert (t.schema, t.table) == (schema, table)


@pytest.mark.parametrize("table", ["a.b.c", '"unclosed.x', "a..b", '"a"b'])
def test_unreadable_table_name_is_a_config_error(table: str) -> None:
    with pytest.raises(ConfigError, match=r"target 'docs'\.table: cannot read"):
        settings(target(table=table))


@pytest.mark.parametrize(("document", "message"), [
    ({"target": [target(dimension=384)]},
     "target 'docs': unknown field(s) dimension (did you mean 'dimensions'?)"),
    ({"target": [target()], "worker": {"pool_max_sise": 8}},
     "worker: unknown field(s) pool_max_sise (did you mean 'pool_max_size'?)"),
    ({"target": [target()], "workers": {"poll_interval": 2}},
     "config: unknown section or key(s) workers (did you mean 'worker'?)"),
    ({"target": [target()], "defaults": {"batchsize": 8}},
     "defaults: unknown field(s) batchsize (did you mean 'batch_size'?)"),
    ({"target": [target(text_columns=["title", "body"])]},
     "target 'docs': both text_column and text_columns are set"),
])
def test_typos_are_refused_with_the_nearest_valid_name(document: dict[str, object],
                                                      message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_settings(document, ENV)
    assert message in str(error.value)


def test_worker_retry_backoff_is_a_positive_number_of_seconds() -> None:
    assert settings(target()).retry_backoff_seconds == 2.0
    assert settings(target(), worker={"retry_backoff_seconds": 0.25}).retry_backoff_seconds == 0.25
    with pytest.raises(ConfigError, match=r"worker\.retry_backoff_seconds: must be > 0"):
        settings(target(), worker={"retry_backoff_seconds": 0})


def test_worker_kept_memory_is_0_to_31_megabytes() -> None:
    assert settings(target()).kept_memory_mb == 16
    assert settings(target(), worker={"kept_memory_mb": 0}).kept_memory_mb == 0
    for value in (-1, 32):
        with pytest.raises(ConfigError,
                           match=rf"worker\.kept_memory_mb: must be between 0 and 31, got {value}"):
            settings(target(), worker={"kept_memory_mb": value})


def test_vector_type_is_optional_and_validated() -> None:
    assert settings(target()).target("docs").storage_type == "vector"
    big = target(provider="openai", model="text-embedding-3-large", dimensions=3072)
    assert settings(big).target("docs").storage_type == "halfvec"
    half = settings(target(vector_type="halfvec")).target("docs")
    assert (half.vector_type, half.storage_type) == ("halfvec", "halfvec")
    for value, message in (("float16", "vector_type: must be one of ('vector', 'halfvec')"),
                           (3, "vector_type: must be a str")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            settings(target(vector_type=value))
    with pytest.raises(ConfigError, match="indexes `vector` only up to 2000 dimensions"):
        settings({**big, "vector_type": "vector"})


@pytest.mark.parametrize("value", ["abc", "-2", "1.5"])
def test_local_threads_must_be_a_whole_number(monkeypatch: pytest.MonkeyPatch,
                                              value: str) -> None:
    """A typo in PGREEMBED_LOCAL_THREADS is a config error naming it, not a bare ValueError."""
    from pgreembed.embedding.providers.local import LocalMiniLM

    monkeypatch.setenv("PGREEMBED_LOCAL_THREADS", value)
    with pytest.raises(ConfigError, match="PGREEMBED_LOCAL_THREADS: must be an integer >= 0"):
        LocalMiniLM()
    monkeypatch.setenv("PGREEMBED_LOCAL_THREADS", "0")
    LocalMiniLM()  # 0: onnxruntime's own choice
