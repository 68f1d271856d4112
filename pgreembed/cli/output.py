"""The one output contract of `--json`: a versioned document per command, on stdout alone.

Every document carries `command` and `version`; its shape is the JSON Schema
pgreembed/cli/schemas/<command>.json. The version grows when a field is removed or
changes meaning (adding a field does not change it). A command that fails before its
document (exit code not 0) prints an error document instead: `command`, `version` and
`error: {code, message}` (the same schema, its `error` branch), so stdout always parses.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from typing import Any

VERSION = 1
_emitted = False  # this process printed its document already (then no error document)


def document(command: str, body: dict[str, Any]) -> dict[str, Any]:
    """`body` with the command's name and the contract's version first."""
    return {"command": command, "version": VERSION, **body}


def emit(command: str, body: dict[str, Any]) -> None:
    global _emitted
    _emitted = True
    print(json.dumps(document(command, body), indent=2, default=str))


def command_name(args: argparse.Namespace) -> str:
    """The name a command's documents carry: `status`, `migrate-swap`, `failures-retry`."""
    name = str(args.command)
    if getattr(args, "step", None):
        name += f"-{args.step}"
    if name == "failures" and getattr(args, "retry", False):
        name += "-retry"
    return name


def emit_error(args: argparse.Namespace, code: int, message: str) -> None:
    """With --json, a failure before the command's document: the error document, so a
    script parsing stdout always gets one (`message` already redacted; also on stderr)."""
    if getattr(args, "json", False) and not _emitted:
        emit(command_name(args), {"error": {"code": code, "message": message}})


def schema(command: str) -> dict[str, Any]:
    """The JSON Schema of `command`'s document (shipped with the package)."""
    text = resources.files("pgreembed.cli").joinpath("schemas", f"{command}.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded
