"""A local, deterministic, OpenAI-compatible embeddings server.

Tests, the demo and benchmarks talk to it over real HTTP with the real ``openai``
client, so retries, timeouts, batching and error handling are exercised end to end
without network access or cost. Faults (429s, 500s, timeouts, wrong dimensions,
poison inputs, TPM/RPM limits global or per model, requests held until released, one
model slowed) can be injected from Python or over HTTP.

"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import signal
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import asdict
from typing import Any

from pgreembed.testing.fake_http import (
    Response,
    ServedApp,
    json_response,
    parse_multipart,
)
from pgreembed.testing.fake_requests import (
    FAULT_TYPES,
    ApiError,
    EmbeddingRequest,
    Faults,
    bad_request,
    check_marker,
    coerce_fault,
    embedding_body,
    embedding_response,
    loads_json,
    parse_batch_file,
    parse_embedding_request,
    refusal,
    string_inputs,
)
from pgreembed.testing.fake_vectors import fake_token_count


class FakeOpenAIServer(ServedApp):
    """Threaded HTTP server speaking the embeddings, files and batches APIs."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None) -> None:
        super().__init__(host, port)
        self.api_key = api_key
        self._faults = Faults()
        self._stats = self._empty_stats()
        self._in_flight = 0
        # Sliding windows of admitted requests, (admitted at, tokens): the global one
        # under the key None, and one per model named in `model_limits`.
        self._windows: dict[str | None, deque[tuple[float, int]]] = {}
        self._files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._batches: dict[str, dict[str, Any]] = {}

    # -- lifecycle -------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self.origin + "/v1"

    thread_name = "fake-openai"

    def start(self) -> FakeOpenAIServer:
        super().start()
        return self

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    # -- faults and stats ------------------------------------------------------
    def set_faults(self, **changes: Any) -> None:
        """Merge fault settings; unknown names raise ValueError (typos would hide bugs)."""
        unknown = set(changes) - set(FAULT_TYPES)
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        coerced = {name: coerce_fault(name, value) for name, value in changes.items()}
        with self._lock:
            for name, value in coerced.items():
                setattr(self._faults, name, value)

    def faults(self) -> dict[str, Any]:
        with self._lock:
            return asdict(self._faults)

    def reset(self) -> None:
        """Clear faults, stats and the rate-limit window (files and batches stay)."""
        with self._lock:
            self._faults = Faults()
            self._stats = self._empty_stats()
            self._windows.clear()

    @staticmethod
    def _empty_stats() -> dict[str, Any]:
        return {"requests": 0, "status_counts": {}, "inputs_embedded": 0,
                "tokens_embedded": 0, "text_counts": {}, "max_concurrency": 0,
                "file_downloads": {}}  # file contents downloaded, per file purpose

    def _record_success(self, req: EmbeddingRequest) -> None:
        with self._lock:
            self._stats["inputs_embedded"] += len(req.inputs)
            self._stats["tokens_embedded"] += sum(req.tokens)
            counts = self._stats["text_counts"]
            for text in req.inputs:
                counts[text] = counts.get(text, 0) + 1

    # -- request handling ------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        """Route one request; embeddings calls are counted in the stats."""
        if method == "POST" and path == "/v1/embeddings":
            with self._lock:
                self._stats["requests"] += 1
                self._in_flight += 1
                self._stats["max_concurrency"] = max(self._stats["max_concurrency"],
                                                     self._in_flight)
        try:
            resp = self._route(method, path, headers, body)
        except ApiError as err:
            resp = json_response(err.status, err.body(), err.headers)
        except Exception:  # a bug here must not look like a network error to clients
            traceback.print_exc()
            resp = json_response(500, ApiError(500, "fake server bug", "server_error").body())
        if method == "POST" and path == "/v1/embeddings":
            with self._lock:
                self._in_flight -= 1
                codes = self._stats["status_counts"]
                codes[str(resp.status)] = codes.get(str(resp.status), 0) + 1
        return resp

    def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Response:
        if (method, path) == ("GET", "/_stats"):
            return json_response(200, self.stats())
        if (method, path) == ("GET", "/_control"):
            return json_response(200, self.faults())
        if (method, path) == ("POST", "/_control"):
            changes = loads_json(body)
            if not isinstance(changes, dict):
                raise bad_request("expected a JSON object of fault fields")
            try:
                self.set_faults(**changes)
            except ValueError as exc:
                raise bad_request(str(exc)) from None
            return json_response(200, self.faults())
        if (method, path) == ("POST", "/_reset"):
            self.reset()
            return json_response(200, {"ok": True})
        if path.startswith("/v1/"):
            self._check_auth(headers.get("authorization", ""))
            if self._faults.latency > 0:
                self._stopping.wait(self._faults.latency)
            if (method, path) == ("POST", "/v1/embeddings"):
                return self._embeddings(body)
            if (method, path) == ("POST", "/v1/files"):
                return self._upload(headers.get("content-type", ""), body)
            if (method, path) == ("POST", "/v1/batches"):
                return json_response(200, self._create_batch(loads_json(body)))
            if method == "GET" and (m := re.fullmatch(r"/v1/batches/([\w-]+)", path)):
                return json_response(200, self._lookup(self._batches, m.group(1)))
            if method == "GET" and (m := re.fullmatch(r"/v1/files/([\w-]+)(/content)?", path)):
                obj, data = self._lookup(self._files, m.group(1))
                if m[2]:
                    with self._lock:
                        downloads = self._stats["file_downloads"]
                        downloads[obj["purpose"]] = downloads.get(obj["purpose"], 0) + 1
                    self._stopping.wait(self._faults.file_content_delay)
                    return Response(200, data, "application/octet-stream")
                return json_response(200, obj)
        raise ApiError(404, f"Invalid URL ({method} {path})")

    def _check_auth(self, header: str) -> None:
        if self.api_key is not None and header != f"Bearer {self.api_key}":
            # Never echo the presented key unless asked: it may be a real one sent by mistake.
            quoted = f": {header.removeprefix('Bearer ')}" if self._take(
                "echo_rejected_key_count") else ""
            raise ApiError(401, f"Incorrect API key provided{quoted}.",
                           "invalid_request_error", "invalid_api_key")

    def _embeddings(self, raw: bytes) -> Response:
        """Apply faults in documented precedence, then validate and embed."""
        if self._take("timeout_count"):
            self._stopping.wait(self._faults.timeout_seconds)
        if self._take("error_500_count"):
            raise ApiError(500, "The server had an error while processing your request. "
                           "Sorry about that!", "server_error")
        if self._take("quota_count"):
            raise ApiError(429, "You exceeded your current quota, please check your plan and "
                           "billing details.", "insufficient_quota", "insufficient_quota")
        if self._take("rate_limit_count"):
            raise self._rate_limited("requests", "Rate limit reached (injected).",
                                     self._faults.rate_limit_retry_after,
                                     self._faults.rate_limit_retry_after_ms)
        body = loads_json(raw)
        self._admit(body)
        req = parse_embedding_request(body)
        if req.model == self._faults.slow_model and self._faults.slow_model_latency > 0:
            # Ends early once the test clears the fault: a worker stopped after it does not
            # wait out a 30 s request.
            deadline = time.monotonic() + self._faults.slow_model_latency
            while (time.monotonic() < deadline and self._faults.slow_model == req.model
                   and not self._stopping.wait(min(0.05, deadline - time.monotonic()))):
                pass
        self._hold(req.inputs)
        check_marker(req.inputs, self._faults.bad_input_marker)
        payload = embedding_body(req, 1 if self._take("wrong_dims_count") else 0,
                                 self._faults.degraded_models)
        self._record_success(req)
        return Response(200, payload)

    def _hold(self, inputs: list[str]) -> None:
        """Keep the request waiting while `hold_marker` is set and one input contains it."""
        while (marker := self._faults.hold_marker) and any(marker in t for t in inputs):
            if self._stopping.wait(0.01):
                return

    @staticmethod
    def _rate_limited(kind: str, message: str, seconds: float,
                      ms: float | None = None) -> ApiError:
        headers = {"retry-after": f"{seconds:g}"}
        if ms is not None:
            headers["retry-after-ms"] = f"{ms:g}"
        return ApiError(429, message, kind, "rate_limit_exceeded", None, headers)

    def _admit(self, body: object) -> None:
        """Sliding 60 s windows for RPM/TPM, global and per model; a rejected request
        uses no budget of either."""
        tokens = sum(fake_token_count(s) for s in string_inputs(body))
        model = body.get("model") if isinstance(body, dict) else None
        with self._lock:
            limits: list[tuple[str | None, int | None, int | None]] = [
                (None, self._faults.requests_per_minute, self._faults.tokens_per_minute)]
            per_model = self._faults.model_limits.get(model) if isinstance(model, str) else None
            if per_model:
                limits.append((model, per_model.get("requests_per_minute"),
                               per_model.get("tokens_per_minute")))
            now = time.monotonic()
            windows = [(key, self._windows.setdefault(key, deque()), rpm, tpm)
                       for key, rpm, tpm in limits if rpm or tpm]
            refused = next(((key, why) for key, window, rpm, tpm in windows
                            if (why := refusal(window, rpm, tpm, tokens, now))), None)
            if refused is None:
                for _, window, _, _ in windows:
                    window.append((now, tokens))
                return
        key, (wait, kind, limit, used) = refused
        unit = "RPM" if kind == "requests" else "TPM"
        scope = f" for {model}" if key is not None else ""
        raise self._rate_limited(
            kind, f"Rate limit reached{scope} on {kind} per min ({unit}): Limit {limit}, "
            f"Used {used}, Requested {tokens}. Please try again in {wait:.3f}s.",
            round(wait, 3), math.ceil(wait * 1000))

    # -- files and batches -----------------------------------------------------
    def _new_file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": f"file-{uuid.uuid4().hex[:24]}", "object": "file", "bytes": len(data),
            "created_at": int(time.time()), "filename": filename, "purpose": purpose,
            "status": "processed"}
        with self._lock:
            self._files[obj["id"]] = (obj, data)
        return obj

    def _upload(self, content_type: str, body: bytes) -> Response:
        parts = parse_multipart(content_type, body)
        if "file" not in parts or "purpose" not in parts:
            raise bad_request("Missing required 'file' or 'purpose' form field.")
        filename, data = parts["file"]
        purpose = parts["purpose"][1].decode()
        return json_response(200, self._new_file(data, filename or "upload", purpose))

    def _lookup(self, table: dict[str, Any], object_id: str) -> Any:
        with self._lock:
            if object_id not in table:
                raise ApiError(404, f"No such object: '{object_id}'", code="not_found")
            return copy.deepcopy(table[object_id])

    def _create_batch(self, body: object) -> dict[str, Any]:
        if not isinstance(body, dict) or body.get("endpoint") != "/v1/embeddings":
            raise bad_request("Only endpoint '/v1/embeddings' is supported.", "endpoint")
        if body.get("completion_window") != "24h":
            raise bad_request("completion_window must be '24h'.", "completion_window")
        with self._lock:
            found = self._files.get(str(body.get("input_file_id")))
        if found is None:
            raise bad_request("Invalid 'input_file_id': file not found.", "input_file_id")
        batch: dict[str, Any] = {
            "id": f"batch_{uuid.uuid4().hex[:24]}", "object": "batch",
            "endpoint": "/v1/embeddings", "input_file_id": found[0]["id"],
            "completion_window": "24h", "status": "validating", "created_at": int(time.time()),
            "output_file_id": None, "error_file_id": None, "errors": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata")}
        lines, problem = parse_batch_file(found[1])
        with self._lock:
            self._batches[batch["id"]] = batch
            if problem:
                batch.update(status="failed", failed_at=int(time.time()), errors={
                    "object": "list", "data": [problem]})
                return dict(batch)
            batch.update(status="in_progress", in_progress_at=int(time.time()))
        if self._faults.batch_delay > 0:
            timer = threading.Timer(self._faults.batch_delay, self._run_batch, (batch, lines))
            timer.daemon = True
            timer.start()
        else:
            self._run_batch(batch, lines)
        with self._lock:
            return dict(batch)

    def _run_batch(self, batch: dict[str, Any], lines: list[dict[str, Any]]) -> None:
        """Answer each line; failures go to the error file, as in the real API."""
        out: list[str] = []
        err: list[str] = []
        for line in lines:
            status, resp_body = self._batch_line(line)
            record = {"id": f"batch_req_{uuid.uuid4().hex[:24]}",
                      "custom_id": line.get("custom_id"),
                      "response": {"status_code": status, "request_id": uuid.uuid4().hex,
                                   "body": resp_body}, "error": None}
            (out if status == 200 else err).append(json.dumps(record))
        out_id, err_id = (self._new_file("\n".join(rows).encode() + b"\n", name,
                                         "batch_output")["id"] if rows else None
                          for rows, name in ((out, "output.jsonl"), (err, "errors.jsonl")))
        with self._lock:
            batch.update(status="completed", completed_at=int(time.time()),
                         output_file_id=out_id, error_file_id=err_id, request_counts={
                             "total": len(lines), "completed": len(out), "failed": len(err)})

    def _batch_line(self, line: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            if line.get("method") != "POST" or line.get("url") != "/v1/embeddings":
                raise bad_request("Batch lines must POST to /v1/embeddings.", "url")
            req = parse_embedding_request(line.get("body"))
            check_marker(req.inputs, self._faults.bad_input_marker)
        except ApiError as exc:
            return exc.status, exc.body()
        self._record_success(req)
        return 200, embedding_response(req, degraded=self._faults.degraded_models)


def main(argv: list[str] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; prints the base_url so scripts can capture it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--latency", type=float, default=0.0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = FakeOpenAIServer(args.host, args.port, api_key=args.api_key)
    server.set_faults(latency=args.latency)
    server.start()
    print(server.base_url, flush=True)
    while not stop.wait(0.2):
        pass
    server.stop()


if __name__ == "__main__":
    main()
