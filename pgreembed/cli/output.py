"""The one output contract of `--json`: a versioned document per command, on stdout alone.

Every document carries `command` and `version`; its shape is the JSON Schema
pgreembed/cli/schemas/<command>.json. The version grows when a field is removed or
changes meaning (adding a field does not change it).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

VERSION = 1


def document(command: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body` with the command's name and the contract's version first."""
    return {"command": command, "version": VERSION, **body}


def emit(command: str, body: dict[str, Any]) -> None:
    print(json.dumps(document(command, body), indent=2, default=str))


def schema(command: str) -> dict[str, Any]:
    """The JSON Schema of `command`'s document (shipped with the package)."""
    text = resources.files("pgreembed.cli").joinpath("schemas", f"{command}.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded
