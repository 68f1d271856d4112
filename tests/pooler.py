"""A real PgBouncer in transaction mode in front of a test's database, for one role: what
Supabase, Neon and most managed poolers give the workers (docs/operations.md, "Connection
poolers"). Tests using it skip where no `pgbouncer` binary is installed (`.ci/run`
installs Debian's): `requires_pgbouncer`."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgreembed.testing.services import SYSTEM_USER, free_port

# Fewer server connections than the workers' pool opens as clients, all open from the
# start and handed out in turn (server_round_robin): consecutive transactions of one
# client land on different server sessions, as under load they would.
SERVER_CONNECTIONS = 2

CONFIG = """\
[databases]
{dbname} = {server}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = plain
auth_file = {auth_file}
admin_users = {user}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = {pool_size}
server_round_robin = 1
max_client_conn = 100
ignore_startup_parameters = extra_float_digits
logfile = {logfile}
"""


def pgbouncer_binary() -> str | None:
    found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    return found if Path(found).exists() else None


# Checked before the test's setup runs (not inside it, after seeding and filling).
requires_pgbouncer = pytest.mark.skipif(
    pgbouncer_binary() is None, reason="no pgbouncer binary (apt-get install pgbouncer;"
    " .ci/run does)")


@dataclass
class Pooler:
    """A running PgBouncer: `dsn` reaches the database through it as the role."""

    dsn: str
    admin_dsn: str
    process: subprocess.Popen[bytes]
    folder: Path

    def transactions(self, dbname: str) -> int:
        """Transactions PgBouncer has passed to `dbname` (its SHOW STATS)."""
        with psycopg.connect(self.admin_dsn, autocommit=True,
                             cursor_factory=psycopg.ClientCursor) as conn:
            cursor = conn.execute("SHOW STATS")
            names = [column.name for column in cursor.description or ()]
            for row in cursor.fetchall():
                stats = dict(zip(names, row, strict=True))
                if stats["database"] == dbname:
                    return int(stats["total_xact_count"])
        return 0

    def log(self) -> str:
        return (self.folder / "pgbouncer.log").read_text(errors="replace")


def _run_as() -> list[str]:
    """PgBouncer refuses to run as root: as root, run it as the embedded server's user
    (who can reach that server's socket) or nobody."""
    if os.geteuid() != 0:
        return []
    for name in (SYSTEM_USER, "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return ["-u", name]
    return []


@contextlib.contextmanager
def transaction_pooler(dsn: str) -> Iterator[Pooler]:
    """PgBouncer in transaction mode for `dsn`'s database and role (its password)."""
    binary = pgbouncer_binary()
    if binary is None:
        pytest.skip("no pgbouncer binary (apt-get install pgbouncer; .ci/run does)")
    params = conninfo_to_dict(dsn)
    user, password, dbname = str(params["user"]), str(params["password"]), str(params["dbname"])
    server = " ".join(f"{key}={params[key]}" for key in ("host", "port", "dbname")
                      if params.get(key))
    folder = Path(tempfile.mkdtemp(prefix="pgreembed-pooler-"))
    folder.chmod(0o755)  # PgBouncer runs as another user (_run_as)
    port = free_port()
    (folder / "users.txt").write_text(f'"{user}" "{password}"\n')
    (folder / "pgbouncer.log").touch()
    config = folder / "pgbouncer.ini"
    config.write_text(CONFIG.format(
        dbname=dbname, server=server, port=port, auth_file=folder / "users.txt", user=user,
        pool_size=SERVER_CONNECTIONS, logfile=folder / "pgbouncer.log"))
    for path in folder.iterdir():  # readable by PgBouncer's user; its log writable
        path.chmod(0o666 if path.name == "pgbouncer.log" else 0o644)
    with (folder / "stderr.txt").open("wb") as stderr:
        process = subprocess.Popen([binary, *_run_as(), str(config)],
                                   stdout=subprocess.DEVNULL, stderr=stderr)
    pooled = make_conninfo(dsn, host="127.0.0.1", port=port, connect_timeout=2)
    admin = make_conninfo(pooled, dbname="pgbouncer")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                psycopg.connect(pooled, autocommit=True).close()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(
                        "pgbouncer did not start:\n" + (folder / "stderr.txt").read_text()
                        + (folder / "pgbouncer.log").read_text()) from None
                time.sleep(0.05)
        # Every server connection open (transactions at once need one each), so the round
        # robin has them all to hand out from the first statement on.
        with contextlib.ExitStack() as clients:
            for _ in range(SERVER_CONNECTIONS):
                client = clients.enter_context(psycopg.connect(pooled))
                client.execute("SELECT 1")  # its transaction stays open: a server each
        yield Pooler(pooled, admin, process, folder)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        shutil.rmtree(folder, ignore_errors=True)
