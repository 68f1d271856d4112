"""Commands that read the bookkeeping say "run pgreembed init" (exit 4) before init."""

from __future__ import annotations

import pytest

from tests.helpers import Stack, docs_config, json_document

EXIT_NOT_INITIALIZED = 4
COMMANDS = [("status",), ("status", "--json"), ("tick",), ("tick", "--wait"),
            ("failures", "--target", "docs"), ("failures", "--target", "docs", "--retry")]


def assert_asks_for_init(stack: Stack, args: tuple[str, ...], targets: str) -> None:
    result = stack.cli(*args)
    assert result.returncode == EXIT_NOT_INITIALIZED, (args, result.stdout, result.stderr)
    assert result.stderr.strip() == (f"pgreembed: target(s) {targets} not initialised:"
                                     " run `pgreembed init` first"), (args, result.stderr)


@pytest.mark.parametrize("args", COMMANDS)
def test_before_init_commands_ask_for_init(stack: Stack, args: tuple[str, ...]) -> None:
    assert_asks_for_init(stack, args, "docs")


def test_a_target_added_after_init_is_named(stack: Stack) -> None:
    assert stack.cli("init").returncode == 0
    with stack.connect() as conn:
        conn.execute("CREATE TABLE notes (id int PRIMARY KEY, body text)")
    stack.config_path.write_text(docs_config() + """
[[target]]
name = "notes"
table = "notes"
text_column = "body"
vector_column = "embedding"
provider = "openai"
model = "fake-384"
dimensions = 384
""")
    for args in [("status",), ("tick",), ("failures", "--target", "notes")]:
        assert_asks_for_init(stack, args, "notes")
    result = stack.cli("failures", "--target", "docs", "--json")
    assert result.returncode == 0, result.stderr
    assert json_document(result.stdout)["failures"] == []
