"""Defaults of the measuring operations (recall, tune, verify) that the CLI's options show.

They live apart from those modules (numpy, the providers) so that building the command
line parser, which every `pgreembed` call does, imports none of them.
"""

from __future__ import annotations

DEFAULT_K = 10  # recall@k: neighbours compared
MAX_QUERIES = 1000  # sample queries of one measurement, at most
DEFAULT_QUERIES = 100
DEFAULT_EXACT_TIMEOUT_MS = 30_000  # one exact (sequential-scan) query
DEFAULT_RECALL = 0.95  # the recall `tune` aims for
DEFAULT_TOLERANCE = 0.99  # `doctor --verify`: the lowest cosine similarity that agrees
