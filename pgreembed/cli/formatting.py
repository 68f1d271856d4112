"""How every command's help looks: its description, an example, and one exit-code table."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pgreembed.errors import EXIT_CODES

HELP_EXIT_CODES = "exit codes (every command):\n" + "\n".join(
    f"  {code}  {meaning}" for code, meaning in EXIT_CODES.items())

def add_command(sub: Any, name: str, help_text: str,
                description: str | Callable[[], str], *,
                example: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with an example of its use. A `description` given as
    a function is called only when the help is shown (a docstring of a module the command
    imports when it runs, not when the parser is built)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=None if callable(description) else description,
        epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    if callable(description):
        if isinstance(parser, Parser):
            parser.describe = description
        else:
            parser.description = description()
    return parser


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands refuse options they do not take themselves.

    argparse hands a subcommand's unknown options up to the top parser, whose error then
    shows the top-level usage; here the subcommand that got them says so, with its usage.
    """

    describe: Callable[[], str] | None = None  # the description, made when it is read
    _description: str | None = None

    @property
    def description(self) -> str | None:
        """Read by --help and by shtab's completion script, never by parsing."""
        return self.describe() if self.describe is not None else self._description

    @description.setter
    def description(self, value: str | None) -> None:
        self._description = value

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:  # a leaf: these options are not its own
            self.error(f"unrecognized arguments: {' '.join(extras)} (see `{self.prog} --help`)")
        return parsed, extras


def _whole_number(text: str, least: int, wanted: str) -> int:
    """`text` as an int of at least `least`, or a usage error saying what was `wanted`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0, or a usage error naming the value."""
    return _whole_number(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: a whole number of 0 or more, or a usage error naming the value."""
    return _whole_number(text, 0, "a whole number >= 0")


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PB"
