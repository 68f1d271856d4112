"""One error hierarchy: the CLI maps each domain error to its message and exit code, and
lets a real bug (KeyError, TypeError...) raise with its traceback."""

from __future__ import annotations

import argparse
import ast
from collections.abc import Callable
from pathlib import Path

import pytest

from pgreembed import errors
from pgreembed.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent


def run_raising(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> int:
    def handler(args: argparse.Namespace) -> int:
        raise exc

    def parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser()
        p.set_defaults(handler=handler)
        return p

    monkeypatch.setattr(cli, "build_parser", parser)
    return cli.main([])


@pytest.mark.parametrize(("error", "code", "shown"), [
    (errors.ConfigError("target 'docs'.dimensions: bad"), 2,
     "pgreembed: configuration error: target 'docs'.dimensions: bad"),
    (errors.NotInitializedError("target(s) docs not initialised"), 4,
     "pgreembed: target(s) docs not initialised"),
    (errors.MigrationError("no migration"), 4, "pgreembed: no migration"),
    (errors.TableBusyError("busy"), 4, "pgreembed: busy"),
    (errors.WaitTimeoutError("still 3 rows"), 3, "pgreembed: still 3 rows"),
    (errors.TuneError("no index"), 4, "pgreembed: no index"),
    (errors.NotFoundError("no column"), 1, "pgreembed: no column"),
    (errors.FatalProviderError("bad key"), 1, "pgreembed: bad key"),
    (errors.SetupError("no pgvector"), 4, "pgreembed: no pgvector"),
])
def test_domain_errors_have_a_message_and_an_exit_code(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        error: errors.PgreembedError, code: int, shown: str) -> None:
    assert run_raising(monkeypatch, error) == code
    assert capsys.readouterr().err.strip() == shown


@pytest.mark.parametrize("bug", [KeyError(5), LookupError("x"), TypeError("y")])
def test_bugs_keep_their_traceback(monkeypatch: pytest.MonkeyPatch,
                                   bug: BaseException) -> None:
    with pytest.raises(type(bug)):
        run_raising(monkeypatch, bug)


def test_every_error_class_is_a_pgreembed_error() -> None:
    classes = [v for v in vars(errors).values() if isinstance(v, type)
               and issubclass(v, Exception)]
    assert len(classes) > 10
    assert all(issubclass(c, errors.PgreembedError) for c in classes)


def _raised_or_defined(check: Callable[[ast.AST], bool]) -> list[str]:
    found = []
    for path in sorted((ROOT / "pgreembed").rglob("*.py")):
        if "testing" in path.parts:
            continue  # the fake provider's own HTTP errors are not ours
        for node in ast.walk(ast.parse(path.read_text())):
            if check(node):
                found.append(f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}")
    return found


def test_no_error_class_outside_the_errors_module() -> None:
    def defines_error(node: ast.AST) -> bool:
        return (isinstance(node, ast.ClassDef) and node.name.endswith("Error")
                and not node.name.startswith("_"))

    assert [f for f in _raised_or_defined(defines_error)
            if not f.startswith("pgreembed/errors.py")] == []


def test_no_domain_error_raised_as_a_builtin_lookup_error() -> None:
    def raises_lookup(node: ast.AST) -> bool:
        return (isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
                and isinstance(node.exc.func, ast.Name)
                and node.exc.func.id in ("LookupError", "KeyError", "RuntimeError"))

    assert _raised_or_defined(raises_lookup) == []
