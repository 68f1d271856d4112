"""`pgreembed providers [--json]`: every provider, its extra, whether it is installed, its
wire format, its request limits and the models it knows (dimensions, list prices).

Needs no config, database or network: it is what to read before choosing a provider.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from pgreembed.cli.formatting import add_command
from pgreembed.cli.output import emit
from pgreembed.errors import EXIT_OK

if TYPE_CHECKING:
    from pgreembed.embedding.providers.catalog import ProviderInfo


def describe(info: ProviderInfo) -> dict[str, Any]:
    """One provider as the JSON document lists it."""
    from pgreembed.embedding.providers.catalog import batch_inputs

    return {
        "name": info.name, "extra": info.extra,
        "install": f"pip install 'pgreembed[{info.extra}]'" if info.extra else None,
        "installed": info.installed, "wire": info.wire,
        "input_types": None if info.input_types is None else {
            "document": info.input_types[0], "query": info.input_types[1]},
        "limits": {"inputs_per_request": info.max_batch_inputs,
                   "tokens_per_request": info.max_batch_tokens,
                   "tokens_per_input": info.max_input_tokens},
        "models": [{"name": m.name, "dimensions": list(m.dimensions),
                    "default_dimensions": m.dimensions[0], "shortenable": m.shortenable,
                    "tokens_per_input": m.max_input_tokens,
                    "inputs_per_request": batch_inputs(info.name, m.name),
                    "price_per_mtoken_usd": m.price_per_mtoken} for m in info.models],
    }


def cmd_providers(args: argparse.Namespace) -> int:
    # Here, not at the top: the providers package imports numpy, and every `pgreembed`
    # call builds the parser.
    from pgreembed.embedding.providers.catalog import PROVIDERS

    described = [describe(info) for info in PROVIDERS.values()]
    if args.json:
        emit("providers", {"providers": described})
        return EXIT_OK
    for p in described:
        state = "installed" if p["installed"] else f"not installed: {p['install']}"
        print(f"{p['name']} ({state})")
        print(f"  wire: {p['wire']}")
        limits = p["limits"]
        many = "s" if limits["inputs_per_request"] > 1 else ""
        print(f"  limits: {limits['inputs_per_request']} input{many} and"
              f" {limits['tokens_per_request']:,} tokens a request,"
              f" {limits['tokens_per_input']:,} tokens an input")
        if p["input_types"]:
            print(f"  input types: rows as {p['input_types']['document']!r}, queries as"
                  f" {p['input_types']['query']!r}")
        for m in p["models"]:
            price = m["price_per_mtoken_usd"]
            cost = "price unknown" if price is None else f"${price:g} per 1M tokens"
            sizes = "/".join(str(d) for d in m["dimensions"])
            inputs = m["inputs_per_request"]  # Titan, Vertex's gemini: fewer than above
            own = "" if inputs == limits["inputs_per_request"] else \
                f", {inputs} input{'s' if inputs > 1 else ''} a request"
            print(f"  - {m['name']}: {sizes} dims, {m['tokens_per_input']:,} tokens an"
                  f" input{own}, {cost}")
    return EXIT_OK


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `pgreembed providers` to the CLI's subcommands."""
    help_text = "list the embedding providers, their extras, limits and known models"
    parser = add_command(subparsers, "providers", help_text, help_text,
                         example="pgreembed providers --json")
    parser.set_defaults(handler=cmd_providers)
    parser.add_argument("--json", action="store_true",
                        help="print only the versioned JSON document")
    return parser
