"""Every reference resolves: invariants cited by number exist in docs/architecture.md, every
document named exists in the repository, and every relative Markdown link (and its anchor)
points at something real. A newcomer following a reference must never hit a dead end."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from tests.helpers import ROOT

SOURCES = ("pgreembed", "scheduler", "worker", "tests", "bench", "deploy", "docs", ".ci")
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yaml", ".yml", ".json", ".service", ".timer", ""}


def text_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "Procfile"]
    for top in SOURCES:
        files += [p for p in (ROOT / top).rglob("*")
                  if p.is_file() and p.suffix in TEXT_SUFFIXES and "__pycache__" not in p.parts]
    return files


def documented_invariants() -> set[int]:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## The invariants", 1)[1].split("\n## ", 1)[0]
    return {int(n) for n in re.findall(r"^(\d+)\. \*\*", section, re.MULTILINE)}


def cited_invariants(text: str) -> set[int]:
    cited = set()
    for match in re.finditer(r"[Ii]nvariants? (\d+(?:(?:, | and | or |/)\d+)*)", text):
        cited.update(int(n) for n in re.findall(r"\d+", match.group(1)))
    return cited


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside and line.startswith("#"):
            lines.append(line.lstrip("#"))
    return {slug(line) for line in lines}


def test_every_cited_invariant_is_documented() -> None:
    documented = documented_invariants()
    assert documented == set(range(1, 12))
    missing = {str(path.relative_to(ROOT)): sorted(cited_invariants(path.read_text()) - documented)
               for path in text_files()}
    assert {k: v for k, v in missing.items() if v} == {}


def test_every_named_document_is_in_the_repository() -> None:
    dead = []
    for path in text_files():
        for name in set(re.findall(r"(?<![\w/.:-])([\w./-]+\.md)\b", path.read_text())):
            if not any((base / name).is_file() for base in (ROOT, ROOT / "docs", path.parent)):
                dead.append(f"{path.relative_to(ROOT)}: {name}")
    assert dead == []


def test_every_relative_link_and_anchor_resolves() -> None:
    dead = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part) if file_part else path
            if not linked.exists():
                dead.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                dead.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert dead == []


def test_the_readme_is_short_and_keeps_its_two_commands() -> None:
    """The README is read in five minutes (issue 23: at most 250 lines); its depth lives in
    docs/. Its two commands are a promise to every reader: they stay exactly these."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    install = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[dev]' && "
    assert [line for line in lines if line.startswith(install)] == [
        install + ".venv/bin/pgreembed demo", install + ".venv/bin/python -m pytest"]


# A fragment (provider keys, a sub-table) is read as part of this target; a block that
# starts with a section ([side_fill]) gets this whole target after it.
_TARGET_HEAD = ('[[target]]\nname = "docs"\ntable = "public.docs"\ntext_column = "body"\n'
                'vector_column = "embedding"\n')
_TARGET_TAIL = _TARGET_HEAD + 'provider = "local"\nmodel = "all-MiniLM-L6-v2-onnx-int8"\n' \
    'dimensions = 384\n'


def test_every_toml_example_in_the_docs_parses() -> None:
    """A reader copies these into pgreembed.toml: each must load as the docs say it does."""
    from pgreembed.config import parse_settings
    env = {"DATABASE_URL": "postgresql://app@db/app", "REDIS_URL": "redis://redis"}
    broken = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for block in re.findall(r"```toml\n(.*?)```", path.read_text(), re.DOTALL):
            if "[[target]]" in block:
                source = block
            elif block.lstrip().startswith("["):
                source = block + "\n" + _TARGET_TAIL
            else:
                source = _TARGET_HEAD + block
            try:
                parse_settings(tomllib.loads(source), env)
            except Exception as error:  # noqa: BLE001 - report every broken example at once
                broken.append(f"{path.relative_to(ROOT)}: {type(error).__name__}: {error}")
    assert broken == []
