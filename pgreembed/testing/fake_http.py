"""The fake provider's HTTP plumbing (stdlib http.server): responses, multipart, handler."""

from __future__ import annotations

import copy
import json
import re
import sys
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from pgreembed.testing.fake_requests import bad_request


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] | None = None


def json_response(status: int, obj: object, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(obj).encode(), "application/json", headers)


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """Byte-exact multipart/form-data parser (``cgi`` is gone in 3.13)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not match:
        raise bad_request("Expected multipart/form-data with a boundary.")
    parts: dict[str, tuple[str | None, bytes]] = {}
    for chunk in body.split(b"--" + match.group(1).encode())[1:-1]:
        head, _, data = chunk.partition(b"\r\n\r\n")
        name = re.search(rb';\s*name="([^"]*)"', head)
        filename = re.search(rb';\s*filename="([^"]*)"', head)
        if name:
            parts[name.group(1).decode()] = (
                filename.group(1).decode() if filename else None, data.removesuffix(b"\r\n"))
    return parts


class App(Protocol):
    """What the handler serves: the fake provider's routing (FakeOpenAIServer)."""

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes
               ) -> Response: ...


class FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128  # benchmarks open many connections at once
    app: App

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that time out and hang up; report real bugs."""
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class FakeHandler(BaseHTTPRequestHandler):
    """Thin HTTP adapter around ``FakeOpenAIServer.handle`` (keep-alive capable)."""

    server: FakeHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the access log; request bodies and keys must never be logged."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        # Always drain the body (even for a 401) so keep-alive connections stay in sync.
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {k.lower(): v for k, v in self.headers.items()}
        resp = self.server.app.handle(method, self.path.split("?")[0], headers, body)
        self.send_response(resp.status)
        self.send_header("content-type", resp.content_type)
        self.send_header("content-length", str(len(resp.body)))
        self.send_header("x-request-id", f"req_{uuid.uuid4().hex}")
        for name, value in (resp.headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(resp.body)


class ServedApp:
    """An `App` served over real HTTP on its own thread: start, stop, a context manager,
    and the counters and "next N requests" faults every fake keeps under its lock.

    Subclasses route requests (`handle`) and set `_faults` (a dataclass of fault fields)
    and `_stats` (a dict); `_stopping` wakes handlers that sleep in latency or timeout
    faults when the server stops."""

    thread_name = "fake-http"
    _faults: Any
    _stats: dict[str, Any]

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = FakeHTTPServer((host, port), FakeHandler)
        self._httpd.app = self  # type: ignore[assignment]
        self._thread: threading.Thread | None = None

    @property
    def origin(self) -> str:
        host, port = self._httpd.server_address[:2]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host!s}:{port}"

    def start(self) -> Any:
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,),
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and wake handlers sleeping in latency/timeout faults."""
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._stats)

    def _take(self, name: str) -> bool:
        """Consume one unit of a "next N requests" fault if any is left."""
        with self._lock:
            left = getattr(self._faults, name)
            if left > 0:
                setattr(self._faults, name, left - 1)
            return bool(left > 0)
