"""Configuration: a TOML file (what to embed) plus the environment (where things are, and
the secrets), read into one `Settings` object every process builds at start-up.

    settings.py     Settings, `[worker]`, `[rate_limits]`, parse_settings, load_settings
    target.py       Target: a `[[target]]` table (and `[defaults]`)
    throttle.py     `[throttle]`        side_fill.py   `[side_fill]`
    environment.py  every environment variable pgreembed reads, declared once
    fields.py       how a setting is declared and read; the shared checks
    model_keys.py   the model key        distances.py  the table of distances

Adding a setting: declare it once, as a field of its section's dataclass:

    max_things: int = setting(10, check=positive_number)           # the TOML key max_things
    heartbeat_ms: int = setting(10_000, env=environment.HEARTBEAT_MS)  # from the environment

its name is the TOML key, its annotation the type, then the default and the check
(fields.py); the section's parser reads every declared field and refuses unknown keys
with the nearest name. Adding a sub-table (`[target.<name>]`, say): a frozen dataclass
of `setting` fields in its own module here, read with `read_declared(cls, table,
"<where>")`, its key added to its parent's known keys (TARGET_KEYS, TOP_LEVEL_KEYS),
and a field of that type on the parent. Nothing outside this package reads os.environ
(tests/test_architecture.py).
"""

from pgreembed.config.settings import (
    KEPT_MEMORY_MAX_MB,
    KEPT_MEMORY_MB,
    TOP_LEVEL_KEYS,
    WORKER_KEYS,
    Budget,
    Settings,
    load_settings,
    parse_rate_limits,
    parse_settings,
)
from pgreembed.config.target import (
    LOCAL_MODEL,
    PROVIDERS,
    TARGET_KEYS,
    VECTOR_MAX_INDEXED,
    VECTOR_TYPES,
    Target,
    default_vector_type,
    parse_target,
    split_table_name,
)
from pgreembed.errors import ConfigError

__all__ = [
    "KEPT_MEMORY_MAX_MB", "KEPT_MEMORY_MB", "LOCAL_MODEL", "PROVIDERS", "TARGET_KEYS",
    "TOP_LEVEL_KEYS", "VECTOR_MAX_INDEXED", "VECTOR_TYPES", "WORKER_KEYS", "Budget",
    "ConfigError", "Settings", "Target", "default_vector_type", "load_settings",
    "parse_rate_limits", "parse_settings", "parse_target", "split_table_name",
]
