"""The one table of distances: the name the app queries with, its pgvector operator and opclass."""

from __future__ import annotations

import re

from pgreembed.errors import ConfigError

# Distance the app queries with -> its query operator; the key is pgvector's opclass
# suffix (vector_cosine_ops, halfvec_l2_ops, ...).
DISTANCES = {"cosine": "<=>", "l2": "<->", "ip": "<#>", "l1": "<+>"}
DISTANCE_ALIASES = {"euclidean": "l2", "inner_product": "ip"}


def canonical_distance(name: str, where: str = "distance") -> str:
    """`name` as a key of DISTANCES (aliases accepted), or a ConfigError naming the choices."""
    key = DISTANCE_ALIASES.get(name.lower(), name.lower())
    if key not in DISTANCES:
        choices = ", ".join([*DISTANCES, *DISTANCE_ALIASES])
        raise ConfigError(f"{where}: must be one of {choices}, got {name!r}")
    return key


def opclass_distance(opclass: str | None) -> str | None:
    """The distance a pgvector operator class serves (`vector_l2_ops` -> "l2"), if any."""
    match = re.fullmatch(r"(?:vector|halfvec|sparsevec|bit)_(\w+)_ops", opclass or "")
    return match.group(1) if match else None
