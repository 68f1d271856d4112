"""A real offline corpus: docstrings of the installed Python standard library.

Read with `ast` from the source files, never imported (importing every
stdlib module has side effects), so it is the same on every machine with the
same Python.
"""

from __future__ import annotations

import ast
import inspect
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_Documented = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef
_SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "ensurepip"}


def stdlib_docstrings(limit: int | None = None, min_length: int = 40
                      ) -> Iterator[tuple[str, str]]:
    """(qualified name, cleaned docstring) pairs, in a stable order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIP_PARTS & set(relative.parts):
            continue
        module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for name, node in _documented(tree, module):
            doc = ast.get_docstring(node, clean=False)
            if not doc:
                continue
            text = inspect.cleandoc(doc)
            if len(text) < min_length:
                continue
            yield name, text
            count += 1
            if limit is not None and count >= limit:
                return


def _documented(tree: ast.Module, module: str) -> Iterator[tuple[str, _Documented]]:
    yield module, tree
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name.startswith("_"):
                continue
            yield f"{module}.{node.name}", node
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if (isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                            and not item.name.startswith("_")):
                        yield f"{module}.{node.name}.{item.name}", item
