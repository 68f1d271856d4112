"""Every error pgreembed raises on purpose, under one base class.

The CLI turns a PgreembedError into its message (redacted) and `exit_code`; anything
else (a KeyError, a TypeError) is a bug and keeps its traceback. Messages say what
to do and never contain a secret.
"""

from __future__ import annotations

# The one exit-code table every command uses (docs/cli.md "Exit codes"): the CLI, `tick`,
# `doctor`, `tune` and the errors below return these names, never a number of their own;
# `pgreembed --help` prints EXIT_CODES (tests/test_architecture.py checks both).
EXIT_OK = 0
EXIT_ERROR = 1  # a service failed (Postgres, Redis, the provider); doctor found an error
EXIT_CONFIG = 2  # a usage or configuration error (argparse exits 2 too)
EXIT_TIMEOUT = 3  # a wait (--wait / --timeout) ran out with work left
EXIT_REFUSED = 4  # refused or blocked: not possible now, nothing was changed (a migration
#                   step, plan blockers, the table stayed locked, a target not initialised,
#                   a misconfigured column, a database that cannot host the target as
#                   configured (grants, pgvector, a column), tune found no setting)
EXIT_NOT_INITIALIZED = EXIT_REFUSED
EXIT_MISCONFIGURED = EXIT_REFUSED
EXIT_INTERRUPTED = 130  # what a shell reports for Ctrl-C

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "ok",
    EXIT_ERROR: "service error (Postgres, Redis, the provider; doctor found an error)",
    EXIT_CONFIG: "usage or configuration error",
    EXIT_TIMEOUT: "timeout (--wait / --timeout ran out with work left)",
    EXIT_REFUSED: "refused or blocked (step not possible now, plan blockers, table locked,\n"
                  "     target not initialised, database cannot host the target (init),\n"
                  "     misconfigured column, tune found no setting)",
}

class PgreembedError(Exception):
    """Base class: an expected failure with a message meant for the operator."""

    exit_code = EXIT_ERROR


class ConfigError(PgreembedError, ValueError):
    """A configuration value is missing or wrong; the message names the field."""

    exit_code = EXIT_CONFIG


class MetricsUnavailable(ConfigError):
    """A metrics port is configured but the exporter package is not installed."""


class SetupError(PgreembedError):
    """The database cannot host a target as configured; the message says how to fix it.
    Checked before any change: a refusal (exit 4), not a service failure."""

    exit_code = EXIT_REFUSED


class NotInitializedError(PgreembedError):
    """A configured target has no bookkeeping yet: `pgreembed init` was not run for it."""

    exit_code = EXIT_NOT_INITIALIZED


class NotFoundError(PgreembedError):
    """Something asked for by name (a column, a slot) is not there (any more)."""


class DatabaseError(PgreembedError):
    """A database problem, with any password removed from the message."""


class TableBusyError(PgreembedError):
    """The table stayed locked by other sessions for the whole wait; nothing changed."""

    exit_code = EXIT_REFUSED


class MigrationError(PgreembedError):
    """A migration step cannot run now; the message says why and what to do."""

    exit_code = EXIT_REFUSED


class ImportRefused(PgreembedError):
    """import-pgai cannot adopt (a catalog older than pgai 0.10, a model that differs from
    the stored vectors); nothing was changed, the message says what to do."""

    exit_code = EXIT_REFUSED


class WaitTimeoutError(PgreembedError):
    """A wait (a swap's catch-up, Batch API jobs) ran out of time with work left."""

    exit_code = EXIT_TIMEOUT


class TuneError(PgreembedError):
    """Nothing to tune (no index, no rows); the message says what is missing."""

    exit_code = EXIT_REFUSED


class LiveColumnChanged(PgreembedError):
    """The live column kept changing (swap/rollback) while one search was retried."""


class ProviderError(PgreembedError):
    """Base class of provider failures (messages never contain the API key)."""


class BadInputError(ProviderError):
    """The provider rejected the request's input (HTTP 400): split the batch to find the row."""


class FatalProviderError(ProviderError):
    """Not the rows' fault and not worth retrying now: bad API key, quota exhausted, bad model."""


class MisconfiguredError(ProviderError):
    """The request is at fault, not its rows: every input is rejected (even a one-word
    probe), or the model answers vectors of another size than the slot's column. The
    slot stops until its config is fixed; no row is failed. `tokens`: billed meanwhile."""

    def __init__(self, message: str, tokens: int = 0) -> None:
        super().__init__(message)
        self.tokens = tokens


class ProviderKeyMissing(FatalProviderError, ConfigError):
    """The provider needs an API key the environment does not give: a config error
    (exit 2), and to a worker still fatal (no batch is tried, no row failed)."""

    exit_code = EXIT_CONFIG


class TransientProviderError(ProviderError):
    """Still failing after the retry budget (429s, 5xx, timeouts): try the batch again later."""
