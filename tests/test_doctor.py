"""`pgreembed doctor` on a real Postgres + pgvector: healthy passes, each defect is reported."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import psycopg
from pgvector.psycopg import register_vector

from pgreembed.config import Settings, parse_settings
from pgreembed.operations.doctor.checks import run_doctor
from pgreembed.operations.doctor.findings import ERROR, OK, WARN, Finding
from pgreembed.store.setup import init_target
from tests.helpers import counts, json_document

ROOT = Path(__file__).resolve().parent.parent
DIMS = 384


def settings_for(dsn: str, *tables: str, **overrides: object) -> Settings:
    targets = []
    for table in tables:
        raw: dict[str, object] = {"name": table, "table": f"public.{table}",
                                  "text_column": "body", "vector_column": "embedding",
                                  "provider": "openai", "model": "fake-384",
                                  "dimensions": DIMS}
        raw.update(overrides)
        targets.append(raw)
    return parse_settings({"target": targets}, {"DATABASE_URL": dsn})


def unit_vectors(count: int, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(count, DIMS)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def make_table(dsn: str, name: str, vectors: list[np.ndarray | None],
               texts: list[str | None] | None = None, column_type: str = f"vector({DIMS})"
               ) -> None:
    texts = texts or [f"document {i}" for i in range(len(vectors))]
    with psycopg.connect(dsn, autocommit=True) as conn:
        register_vector(conn)
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, body text,"
                     f" embedding {column_type})")
        with conn.cursor() as cur:
            cur.executemany(f"INSERT INTO {name} VALUES (%s, %s, %s)",
                            [(i, t, v) for i, (t, v) in enumerate(zip(texts, vectors,
                                                                       strict=True))])


def healthy(dsn: str, name: str = "good", rows: int = 60) -> None:
    """Unit vectors for every row, a cosine HNSW index, initialised (vectors adopted)."""
    make_table(dsn, name, list(unit_vectors(rows)))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE INDEX CONCURRENTLY {name}_hnsw ON {name}"
                     " USING hnsw (embedding vector_cosine_ops)")
    settings = settings_for(dsn, name)
    init_target(dsn, settings.target(name))


def pick(findings: list[Finding], target: str | None, check: str) -> list[Finding]:
    return [f for f in findings if f.target == target and f.check == check]


def levels(findings: list[Finding], target: str | None, check: str) -> set[str]:
    return {f.level for f in pick(findings, target, check)}


def run_cli(dsn: str, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": dsn, "PGREEMBED_CONFIG": str(config),
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pgreembed", "doctor", *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def config_file(tmp_path: Path, *tables: str) -> Path:
    body = "".join(
        f'[[target]]\nname = "{t}"\ntable = "public.{t}"\ntext_column = "body"\n'
        f'vector_column = "embedding"\nprovider = "openai"\nmodel = "fake-384"\n'
        f"dimensions = {DIMS}\n\n" for t in tables)
    path = tmp_path / "pgreembed.toml"
    path.write_text(body)
    return path


def test_healthy_target_has_no_errors_or_warnings(database_url: str) -> None:
    healthy(database_url)
    findings = run_doctor(settings_for(database_url, "good"))
    problems = [f for f in findings if f.level != OK]
    assert problems == [], problems
    checks = {f.check for f in findings if f.target == "good"}
    # Every family of checks ran and reported on the target.
    assert {"table", "vector_column", "null_vectors", "models", "norms", "missing_text",
            "index_opclass", "hint_hnsw"} <= checks
    assert levels(findings, None, "pgvector") == {OK}
    assert levels(findings, None, "connections") == {OK}
    [opclass] = pick(findings, "good", "index_opclass")
    assert "good_hnsw" in opclass.message and "vector_cosine_ops" in opclass.message


def test_zero_and_non_normalised_vectors_and_missing_text(database_url: str) -> None:
    unit = unit_vectors(40)
    unit[0] = 0.0
    unit[1:4] *= 3.0
    vectors: list[np.ndarray | None] = list(unit)
    vectors[4] = None
    texts: list[str | None] = [f"doc {i}" for i in range(40)]
    texts[5], texts[6] = None, "  \n "
    make_table(database_url, "bad", vectors, texts)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE INDEX ON bad USING hnsw (embedding vector_cosine_ops)")
    findings = run_doctor(settings_for(database_url, "bad"))
    [zero] = pick(findings, "bad", "zero_vectors")
    assert zero.level == ERROR and "bad.embedding" in zero.message
    assert counts(r"(\d+) of (\d+)", zero.message) == [(1, 39)], zero.message
    [norm] = pick(findings, "bad", "normalised")
    assert norm.level == WARN
    assert counts(r"(\d+) of (\d+)", norm.message) == [(3, 39)], norm.message
    [nulls] = pick(findings, "bad", "null_vectors")
    assert nulls.level == WARN
    assert counts(r"(\d+) rows have no vector", nulls.message) == [(1,)], nulls.message
    [text] = pick(findings, "bad", "missing_text")
    assert text.level == WARN
    assert counts(r"(\d+) rows", text.message) == [(2,)], text.message
    assert any(f.level == ERROR for f in findings)


def test_zero_vectors_are_only_a_warning_for_l2(database_url: str) -> None:
    """Cosine of a zero vector is NaN; under another distance it is suspicious, not broken."""
    unit = unit_vectors(10)
    unit[0] = 0.0
    unit[1] *= 2.0
    make_table(database_url, "l2", list(unit))
    settings = settings_for(database_url, "l2", distance="euclidean")  # an alias of l2
    assert settings.target("l2").distance == "l2"
    findings = run_doctor(settings)
    assert levels(findings, "l2", "zero_vectors") == {WARN}
    assert pick(findings, "l2", "normalised") == []


def test_mixed_dimensions_and_untyped_column(database_url: str) -> None:
    make_table(database_url, "mixed", [np.ones(3, dtype=np.float32) / np.sqrt(3),
                                       unit_vectors(1)[0], unit_vectors(2)[1]],
               column_type="vector")
    findings = run_doctor(settings_for(database_url, "mixed"))
    [column] = pick(findings, "mixed", "vector_column")
    assert column.level == ERROR and "without dimensions" in column.message
    [dims] = pick(findings, "mixed", "dimensions")
    assert dims.level == ERROR
    assert sorted(counts(r"(\d+) dims: (\d+) rows", dims.message)) == [(3, 1), (DIMS, 2)]
    # Never initialised: reported, and nothing was created (the doctor is read-only).
    assert levels(findings, "mixed", "models") == {WARN}
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT to_regclass('pgreembed.slots')").fetchone() == (None,)


def test_vectors_from_several_models(database_url: str) -> None:
    healthy(database_url, "docs", rows=20)
    with psycopg.connect(database_url, autocommit=True) as conn:
        old = conn.execute("INSERT INTO pgreembed.models (key, provider, name, dimensions)"
                           " VALUES ('openai:older-384@384', 'openai', 'older-384', 384)"
                           " RETURNING id").fetchone()
        assert old is not None
        slot = conn.execute("SELECT id FROM pgreembed.slots WHERE target = 'docs'").fetchone()
        assert slot is not None
        conn.execute(f"UPDATE pgreembed.slot_{slot[0]} SET pgr_model_id = %s WHERE pgr_pk < 5",
                     (old[0],))
    findings = run_doctor(settings_for(database_url, "docs"))
    [models] = pick(findings, "docs", "models")
    assert models.level == WARN
    assert dict(re.findall(r"(openai:[\w-]+@384): (\d+)\b", models.message)) == {
        "openai:older-384@384": "5", "openai:fake-384@384": "15"}, models.message


def test_invalid_index_and_wrong_opclass(database_url: str) -> None:
    make_table(database_url, "idx", list(unit_vectors(10)), texts=["same"] * 10)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE INDEX idx_l2 ON idx USING hnsw (embedding vector_l2_ops)")
        with contextlib.suppress(psycopg.errors.UniqueViolation):
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY idx_body_unique ON idx (body)")
        assert conn.execute("SELECT indisvalid FROM pg_index"
                            " WHERE indexrelid = 'idx_body_unique'::regclass").fetchone() == (
            False,)
    findings = run_doctor(settings_for(database_url, "idx"))
    [invalid] = pick(findings, "idx", "index_invalid")
    assert invalid.level == ERROR and "idx_body_unique" in invalid.message
    assert "INVALID" in invalid.message
    [opclass] = pick(findings, "idx", "index_opclass")
    assert opclass.level == WARN
    assert "idx_l2" in opclass.message and "vector_l2_ops" in opclass.message
    assert "vector_cosine_ops" in opclass.message


def test_no_ann_index_and_wrong_column_size(database_url: str) -> None:
    make_table(database_url, "plain", list(unit_vectors(5)))
    findings = run_doctor(settings_for(database_url, "plain"))
    assert levels(findings, "plain", "index") == {WARN}
    # The same table configured for another model size: the column does not fit.
    wrong = run_doctor(settings_for(database_url, "plain", model="fake-1536", dimensions=1536))
    [column] = pick(wrong, "plain", "vector_column")
    assert column.level == ERROR and "vector(384)" in column.message
    assert "vector(1536)" in column.message


def test_missing_table_and_connection_budget(database_url: str) -> None:
    findings = run_doctor(settings_for(database_url, "nowhere"), worker_processes=100_000)
    [table] = pick(findings, "nowhere", "table")
    assert table.level == ERROR and "public.nowhere does not exist" in table.message
    [budget] = pick(findings, None, "connections")
    assert budget.level == ERROR
    assert counts(r"(\d+) worker processes", budget.message) == [(100_000,)], budget.message


def test_cli_exit_codes_and_json(database_url: str, tmp_path: Path) -> None:
    healthy(database_url)
    good = run_cli(database_url, config_file(tmp_path, "good"))
    assert good.returncode == 0, good.stdout + good.stderr
    assert counts(r"doctor: (\d+) error\(s\), (\d+) warning\(s\)", good.stdout) == [(0, 0)], (
        good.stdout)
    as_json = run_cli(database_url, config_file(tmp_path, "good"), "--json")
    assert as_json.returncode == 0
    parsed = json_document(as_json.stdout)["findings"]
    assert {f["level"] for f in parsed} == {OK}
    assert {"level", "target", "check", "message"} == set(parsed[0])

    vectors: list[np.ndarray | None] = list(unit_vectors(5))
    vectors[0] = np.zeros(DIMS, dtype=np.float32)
    make_table(database_url, "bad", vectors)
    bad = run_cli(database_url, config_file(tmp_path, "good", "bad"), "--json")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    errors = [f for f in json_document(bad.stdout)["findings"] if f["level"] == ERROR]
    assert [(f["target"], f["check"]) for f in errors] == [("bad", "zero_vectors")]
    # --target narrows the check to the healthy one again.
    only_good = run_cli(database_url, config_file(tmp_path, "good", "bad"), "--target", "good")
    assert only_good.returncode == 0, only_good.stdout
    # The password never appears, even when the connection fails.
    refused = run_cli("postgresql://u:s3cretpw@127.0.0.1:1/x", config_file(tmp_path, "good"))
    assert refused.returncode == 1
    assert "s3cretpw" not in refused.stdout + refused.stderr


def test_big_table_is_sampled_not_scanned(database_url: str) -> None:
    """Above 20x the sample size the norm check reads a block sample, capped at --sample."""
    unit = unit_vectors(400)
    unit[::2] *= 2.0
    make_table(database_url, "big", list(unit))
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("ANALYZE big")
    findings = run_doctor(settings_for(database_url, "big"), sample_rows=10)
    [norm] = pick(findings, "big", "normalised")
    match = re.search(r"of (\d+) sampled", norm.message)
    assert match, norm.message
    sampled = int(match[1])
    assert 0 < sampled <= 10
