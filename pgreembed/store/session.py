"""The session settings pgreembed pins on every connection, whatever the database or
role defaults say (managed services and DBAs set them per database and per role).

- READ COMMITTED: the write path reads the slot registry after waiting for the
  writers' advisory lock (store.table_lock); under a default of REPEATABLE READ or
  SERIALIZABLE its snapshot would predate a swap that committed meanwhile, and the
  vectors would land in the other model's column (invariant 7). psycopg's own
  `isolation_level` makes every BEGIN say so; autocommit statements follow the
  session's default_transaction_isolation, set here too.
- idle_in_transaction_session_timeout at most IDLE_IN_TRANSACTION_MS: pgreembed never
  waits on the network or a user inside a transaction, so a session of ours idle in
  one for a minute is a hung process holding the app's table; Postgres ends it rather
  than letting it block the app's DDL (and the queue behind it) forever. A stricter
  value of the role is kept.
- idle_session_timeout 0: the leader lock and the LISTEN connection are idle by
  design (the pool retires its own idle connections); a role's limit would drop the
  leader lock every few minutes.
- statement_timeout is left to the role for ordinary statements (the DBA's guard), but
  lifted for the statements that are long by nature: index builds and ANALYZE
  (`lift_statement_limits`).
- the server's allocator keeps a statement's freed memory for the next one
  (`keep_freed_memory`): on the connections that write vectors.
- search_path is not touched: pgvector may live in a schema of its own (Supabase's
  `extensions`) that the role's search_path names; the triggers we install pin theirs.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import psycopg

from pgreembed.config import KEPT_MEMORY_MAX_MB
from pgreembed.observability.redact import redact
from pgreembed.store import server_versions

log = logging.getLogger(__name__)

IDLE_IN_TRANSACTION_MS = 60_000

_PIN = """
SELECT set_config('default_transaction_isolation', 'read committed', false),
       set_config('idle_session_timeout', '0', false),
       set_config('idle_in_transaction_session_timeout',
                  (SELECT CASE WHEN setting::bigint BETWEEN 1 AND %(idle)s THEN setting
                               ELSE %(idle)s::text END
                   FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'),
                  false)
"""


def pin_session(conn: psycopg.Connection) -> None:
    """Pin our session settings on a new connection (left idle, as the pool requires)."""
    conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
    conn.execute(_PIN, {"idle": IDLE_IN_TRANSACTION_MS})
    if not conn.autocommit:
        conn.commit()


# glibc's malloc (Postgres' allocator on Linux) maps a big block with mmap and gives
# freed memory at the top of its heap back to the OS; both thresholds start at 128 kB and
# rise only when a mapped block is freed (the mmap threshold to its size, the trim
# threshold to twice that), and only for a block of at most 32 MB. A statement that
# inserts into an HNSW index allocates a few MB (pgvector copies each graph element it
# visits), so every small write slice through HNSW faulted those pages in again,
# zero-filled by the kernel: ~1,300-1,900 minor page faults a statement, 1.2-1.4x the
# Postgres CPU of the same rows in 512-row statements (bench.hnsw_statement_cost). One
# value of `[worker] kept_memory_mb` (16 MB by default), allocated and freed once a
# session, raises them to 16 and 32 MB: the backend keeps the memory for its next
# statement (15 faults a statement). 8 sufficed at 1536 dims, m 16, ef_construction 64
# (~7.5 MB a statement; 2 MB did not). Other allocators ignore it.
# OFFSET 0: `repeat` of a constant would be folded while planning, making the value twice.
_KEEP_FREED_MEMORY = ("SELECT octet_length(repeat(repeat('x', 4096), n))"
                      " FROM (SELECT %s * 256 AS n OFFSET 0) AS size")


def keep_freed_memory(conn: psycopg.Connection, megabytes: int) -> None:
    """Let this session's backend keep its freed memory between statements (see above):
    ~13 ms once (16 MB), then several ms less per statement through an HNSW index. For
    long-lived connections that write vectors (the workers' pool), called on a fresh
    connection (it commits); the backend then holds about twice `megabytes` it freed
    instead of returning it at once. 0: nothing. Best effort: a failure (a small
    statement_timeout, no memory to spare) is logged and the session goes on without."""
    if not 0 <= megabytes <= KEPT_MEMORY_MAX_MB:  # glibc raises none for a bigger block
        raise ValueError(f"kept memory: 0 to {KEPT_MEMORY_MAX_MB} MB, got {megabytes}")
    if megabytes == 0:
        return
    try:
        conn.execute(_KEEP_FREED_MEMORY, (megabytes,))
        if not conn.autocommit:
            conn.commit()
    except psycopg.Error as exc:
        if conn.broken:
            raise
        conn.rollback()
        log.warning("could not set this session up to keep its freed memory (%s): small"
                    " writes through an HNSW index cost it more CPU",
                    redact(str(exc)).strip())


def lift_statement_limits(conn: psycopg.Connection) -> None:
    """No statement or transaction timeout for this session (an index build, ANALYZE):
    a role's statement_timeout would cancel every build of a big table, so a side fill
    would never finish. Use on a dedicated connection (it keeps the setting)."""
    conn.execute("SELECT set_config('statement_timeout', '0', false)")
    # transaction_timeout exists from Postgres 17 on; each CONCURRENTLY phase is one.
    if server_versions.postgres_num(conn) >= 170000:
        conn.execute("SELECT set_config('transaction_timeout', '0', false)")


@contextlib.contextmanager
def statement_limits_lifted(conn: psycopg.Connection) -> Iterator[None]:
    """`lift_statement_limits` for the block only, on a connection that goes on with the
    DBA's timeouts afterwards (a side fill's copy pages after building its index)."""
    saved = conn.execute("SELECT current_setting('statement_timeout'),"
                         " current_setting('transaction_timeout', true)").fetchone()
    assert saved is not None
    lift_statement_limits(conn)
    try:
        yield
    finally:
        if not conn.broken:
            conn.execute("SELECT set_config('statement_timeout', %s, false)", (saved[0],))
            if saved[1] is not None:
                conn.execute("SELECT set_config('transaction_timeout', %s, false)",
                             (saved[1],))
