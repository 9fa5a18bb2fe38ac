"""A real HTTP server on 127.0.0.1 for tests (a stand-in FHIR endpoint): records requests, answers as told."""

from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .net import free_port


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


class HttpListener:
    """Answers every POST with `status` and `body` (JSON); `delay_s` holds the answer back (for timeouts)."""

    def __init__(self, status: int = 200, body: object | None = None, *, delay_s: float = 0.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.status, self.body, self.delay_s, self.ssl_context = status, body, delay_s, ssl_context
        self.host, self.port = "127.0.0.1", free_port()
        self.requests: list[Received] = []
        self._release = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}/fhir"

    def start(self) -> "HttpListener":
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", "0"))
                outer.requests.append(Received("POST", self.path, dict(self.headers), self.rfile.read(length)))
                if outer.delay_s:
                    outer._release.wait(outer.delay_s)
                payload = json.dumps(outer.body if outer.body is not None else {}).encode()
                try:
                    self.send_response(outer.status)
                    self.send_header("Content-Type", "application/fhir+json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        if self.ssl_context is not None:
            self._server.socket = self.ssl_context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"http-listener-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HttpListener":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
