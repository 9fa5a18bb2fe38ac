"""A real MLLP (HL7 v2) server on 127.0.0.1 for tests: records what it gets and answers as told.

mode: "AA" / "AE" / "AR" answer an ACK with that MSA-1 (MSA-3 = `text`), "silent" takes the message and
never answers (the client's ACK timeout), "wrong-id" answers AA for another control id.
Use it as a context manager, so the test that starts it also stops it.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from datetime import datetime, timezone

from .net import free_port

START, END = b"\x0b", b"\x1c\x0d"


def escape(text: str) -> str:
    """HL7 escaping of free text (\\ first, so the escapes added after it stay as they are)."""
    for char, seq in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(char, seq)
    return text


def ack_for(message: str, code: str, text: str = "", control_id: str | None = None) -> str:
    """An HL7 v2.5 ACK for `message`, addressed back to its sender."""
    msh = message.split("\r", 1)[0].split("|")
    ctrl = control_id if control_id is not None else msh[9]
    now = datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S")
    return (f"MSH|^~\\&|{msh[4]}|{msh[5]}|{msh[2]}|{msh[3]}|{now}||ACK^R01^ACK|ACK{ctrl}|P|2.5\r"
            f"MSA|{code}|{ctrl}|{escape(text)}\r")


class MllpListener:
    def __init__(self, mode: str = "AA", *, text: str = "", ssl_context: ssl.SSLContext | None = None) -> None:
        self.mode, self.text, self.ssl_context = mode, text, ssl_context
        self.host, self.port = "127.0.0.1", free_port()
        self.messages: list[str] = []
        self.errors: list[str] = []  # e.g. TLS handshakes the server refused
        self._stop = threading.Event()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    def _handle(self, sock: socket.socket) -> None:
        if self.ssl_context is not None:
            try:
                sock = self.ssl_context.wrap_socket(sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(f"TLS: {exc}")
                return
        sock.settimeout(0.2)
        buf = b""
        while not self._stop.is_set():
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, TimeoutError):
                continue
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(str(exc))
                return
            if not chunk:
                return
            buf += chunk
            while START in buf and END in buf:
                start, end = buf.index(START), buf.index(END)
                message = buf[start + 1:end].decode("utf-8")
                buf = buf[end + 2:]
                self.messages.append(message)
                if self.mode == "silent":
                    continue
                if self.mode == "wrong-id":
                    reply = ack_for(message, "AA", control_id="SOMEONE-ELSE")
                else:
                    reply = ack_for(message, self.mode, self.text)
                sock.sendall(START + reply.encode("utf-8") + END)

    def start(self) -> "MllpListener":
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self._server = Server((self.host, self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"mllp-listener-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "MllpListener":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
