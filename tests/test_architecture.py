"""The layout's rules, checked by parsing every module (only the exit-code table and the
environment declarations are imported, to compare them with docs/).

    cli/  ->  scheduler/, worker/ (processes)  ->  pgreembed core  ->  pgreembed.store
          ->  the ground floor (values, errors, config, observability.redact)

Besides imports it checks, by parsing the code: exit codes spelled only in
pgreembed/errors.py, the environment read only by pgreembed/config/, and SQL run by the
processes and the data path only through store/ functions.

Every import counts, also the ones inside functions (a lazy import is still a
dependency); only `if TYPE_CHECKING:` blocks are left out.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pgreembed", "worker", "scheduler")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


MODULES = modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child):
            yield from (n for other in child.orelse for n in [other, *_walk(other)])
            continue
        yield child
        yield from _walk(child)


def _resolve(name: str) -> str | None:
    """The project module an imported name lives in (a module, or a name in a module)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> set[str]:
    """Project modules `module` imports (relative imports resolved, packages included)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            names = [f"{base}.{alias.name}" for alias in node.names] or [base]
        for name in names:
            resolved = _resolve(name)
            if resolved and resolved != module:
                found.add(resolved)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_sees_the_layout() -> None:
    """A parser that found nothing would pass every rule below."""
    assert "pgreembed.store.slots" in GRAPH["pgreembed.store.rows"]
    assert "pgreembed.queue.contract" in GRAPH["scheduler.dispatch"]
    assert len(MODULES) > 60


def test_scheduler_never_imports_worker() -> None:
    """The scheduler sends by the queue contract's names; it never loads the actors."""
    bad = {m: sorted(d for d in deps if _in(d, "worker"))
           for m, deps in GRAPH.items() if _in(m, "scheduler")}
    assert not {m: d for m, d in bad.items() if d}


@pytest.mark.parametrize("package", ["pgreembed", "worker", "scheduler"])
def test_core_never_imports_the_cli(package: str) -> None:
    """Only the CLI's own modules (and `python -m pgreembed`, which is the CLI) import it."""
    bad = {m: sorted(d for d in deps if _in(d, "pgreembed.cli"))
           for m, deps in GRAPH.items()
           if _in(m, package) and not _in(m, "pgreembed.cli") and m != "pgreembed.__main__"}
    assert not {m: d for m, d in bad.items() if d}


def test_pgreembed_never_imports_the_processes() -> None:
    """pgreembed/ is the core the processes stand on, except the CLI that starts them."""
    bad = {m: sorted(d for d in deps if _in(d, "worker") or _in(d, "scheduler"))
           for m, deps in GRAPH.items()
           if _in(m, "pgreembed") and not _in(m, "pgreembed.cli") and m != "pgreembed.__main__"}
    assert not {m: d for m, d in bad.items() if d}


GROUND_FLOOR = ("pgreembed.values", "pgreembed.errors", "pgreembed.config",
                "pgreembed.observability.redact")


def test_store_imports_no_feature() -> None:
    """The store knows nothing of embedding, migrations, operations or the CLI: it
    stands on the ground floor only (the value types,
    the errors, the config, redaction)."""
    bad = {m: sorted(d for d in deps if not any(_in(d, f) for f in
                                                ("pgreembed.store", *GROUND_FLOOR)))
           for m, deps in GRAPH.items() if _in(m, "pgreembed.store")}
    assert not {m: d for m, d in bad.items() if d}


def test_the_ground_floor_stands_alone() -> None:
    """Value types, errors, config and redaction import nothing of the floors above."""
    bad = {m: sorted(d for d in deps if not any(_in(d, f) for f in GROUND_FLOOR))
           for m, deps in GRAPH.items() if any(_in(m, f) for f in GROUND_FLOOR)}
    assert not {m: d for m, d in bad.items() if d}


def environment_reads(module: str) -> list[str]:
    """Where `module` reads the process environment itself (os.environ, os.getenv)."""
    path = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id == "os" and node.attr in ("environ", "environb", "getenv")):
            found.append(f"line {node.lineno}: os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            found += [f"line {node.lineno}: from os import {a.name}" for a in node.names
                      if a.name in ("environ", "environb", "getenv")]
    return found


def test_the_environment_is_read_only_by_the_config() -> None:
    """Every environment variable is declared once in pgreembed/config/environment.py
    (name, default) and read through it, so docs/configuration.md's list is the whole
    list. No exemption: pgreembed/testing/ builds its services' environments from
    arguments, and the demo hands its processes `config.environment.child_environment()`."""
    bad = {m: found for m in MODULES
           if not _in(m, "pgreembed.config") and (found := environment_reads(m))}
    assert not bad, f"read these through pgreembed.config.environment: {bad}"


def sql_statements(module: str) -> list[str]:
    """Lines of `module` that run a statement of their own (`x.execute(<statement>)`,
    executemany, copy); a Redis pipeline's argument-less execute() is not one."""
    path = MODULES[module]
    return [f"line {node.lineno}" for node in ast.walk(ast.parse(path.read_text(), str(path)))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("execute", "executemany", "copy") and node.args]


# Where the SQL is: every statement of the processes and of the data path is a function of
# store/; migrations/ and operations/ (the operator's commands) run their own statements,
# through store/'s connections and psycopg.sql (docs/architecture.md, "Layout").
SQL_FREE = ("scheduler", "worker", "pgreembed.queue", "pgreembed.embedding",
            "pgreembed.config", "pgreembed.observability", "pgreembed.cli")


def test_the_processes_and_the_data_path_run_sql_only_through_the_store() -> None:
    bad = {m: found for m in MODULES
           if any(_in(m, p) for p in SQL_FREE) and (found := sql_statements(m))}
    assert not bad, f"move these statements into a pgreembed.store function: {bad}"


def test_every_environment_variable_is_documented() -> None:
    """The declarations are the whole list (the rule above); each is named in docs/."""
    from pgreembed.config import environment

    docs = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    names = [v.name for v in vars(environment).values() if isinstance(v, environment.EnvVar)]
    assert len(names) > 10
    assert not [name for name in names if f"`{name}" not in docs and f"${name}" not in docs]


def test_data_path_imports_no_feature() -> None:
    """The hot path (queue, embedding, the worker's batch) does not reach into migrations
    or operations; embedding/ is texts to vectors and never loads a batch of its own."""
    features = ("pgreembed.migrations", "pgreembed.operations", "pgreembed.cli")
    bad = {m: sorted(d for d in deps if any(_in(d, f) for f in features))
           for m, deps in GRAPH.items()
           if _in(m, "pgreembed.queue") or _in(m, "pgreembed.embedding") or _in(m, "worker")}
    assert not {m: d for m, d in bad.items() if d}


def _cycle() -> list[str] | None:
    """One import cycle among the project's modules, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for dep in sorted(GRAPH[module]):
            # A package's __init__ is imported on the way to its modules: not an edge back.
            if _in(module, dep) and MODULES[dep].name == "__init__.py":
                continue
            if state.get(dep) == 1:
                return [*stack[stack.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = _cycle()
    assert cycle is None, " -> ".join(cycle or [])


def test_no_module_over_400_lines() -> None:
    long = {m: n for m, p in MODULES.items()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concern: {long}"


def private_imports(module: str) -> list[str]:
    """`from X import _name` in `module` where X is another module of the project."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = node.module or ""
        if node.level:
            parent = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parent, *([base] if base else [])])
        if _resolve(base) in (None, module):
            continue
        found += [f"{base}.{alias.name}" for alias in node.names
                  if alias.name.startswith("_") and not alias.name.startswith("__")]
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    """A leading underscore says "only this module uses it": a name other modules need is
    part of its module's interface, so it gets a public name (and a docstring)."""
    bad = {m: found for m in MODULES if (found := private_imports(m))}
    assert not bad, f"give these public names: {bad}"


def _int_literal(node: ast.AST | None) -> bool:
    """An int written as a number (a bool is not one), or a conditional choosing one."""
    if isinstance(node, ast.IfExp):
        return _int_literal(node.body) or _int_literal(node.orelse)
    return (isinstance(node, ast.Constant) and type(node.value) is int) or (
        isinstance(node, ast.UnaryOp) and _int_literal(node.operand))


# The modules whose functions return a command's exit code.
COMMANDS = ("pgreembed.cli", "pgreembed.demo", "scheduler", "worker")


def exit_code_spellings(module: str) -> list[str]:
    """Exit codes `module` spells itself instead of naming them from pgreembed.errors:
    an EXIT_* or `exit_code` set, a number given to sys.exit/SystemExit, or (in a
    command's module, or a function named exit_code) a number returned."""
    path = MODULES[module]
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                name = target.id if isinstance(target, ast.Name) else (
                    target.attr if isinstance(target, ast.Attribute) else "")
                if name.startswith("EXIT_") or (name == "exit_code"
                                                and _int_literal(node.value)):
                    found.append(f"line {node.lineno}: {name} =")
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("exit", "SystemExit", "_exit") and any(map(_int_literal, node.args)):
                found.append(f"line {node.lineno}: {name}(<number>)")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                node.name == "exit_code" or any(_in(module, c) for c in COMMANDS)):
            found += [f"line {r.lineno}: return <number> in {node.name}"
                      for r in ast.walk(node)
                      if isinstance(r, ast.Return) and _int_literal(r.value)]
    return found


def test_exit_codes_are_defined_once() -> None:
    """pgreembed/errors.py holds the one exit-code table (docs/cli.md "Exit codes"); every
    command returns its names, so a code cannot mean two things in two commands."""
    bad = {m: found for m in MODULES
           if m != "pgreembed.errors" and (found := exit_code_spellings(m))}
    assert not bad, f"use the names of pgreembed.errors' exit-code table: {bad}"


def test_the_exit_code_table_is_the_documented_one() -> None:
    """The numbers are a contract (scripts test them): docs/cli.md's table lists each."""
    from pgreembed import errors

    table = (ROOT / "docs" / "cli.md").read_text().split("**Exit codes**", 1)[1]
    documented = {int(line.split("|")[1]) for line in table.splitlines()
                  if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    named = {value for name, value in vars(errors).items() if name.startswith("EXIT_")
             and isinstance(value, int)}
    assert documented == named == {0, 1, 2, 3, 4, 130}
    assert set(errors.EXIT_CODES) == named - {errors.EXIT_INTERRUPTED}
