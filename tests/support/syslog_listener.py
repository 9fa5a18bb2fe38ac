"""A loopback syslog receiver for tests: RFC 6587 / RFC 5425 octet-counted frames, plain TCP or TLS.

Every frame is parsed strictly as RFC 5424 (`parse_rfc5424`); a frame that does not parse is kept
in `errors`, so a test can assert there were none. Use it as a context manager, or call stop():
the listening socket, every connection and every thread end there.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass

BOM = b"\xef\xbb\xbf"

_HEADER = re.compile(
    rb"<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) "
    rb"(?P<msgid>\S+) (?P<sd>-|\[.*?\])(?: (?P<msg>.*))?\Z", re.DOTALL)
_TIMESTAMP = re.compile(r"-|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})\Z")
_LIMITS = {"host": 255, "app": 48, "procid": 128, "msgid": 32}


@dataclass(frozen=True)
class SyslogMessage:
    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    msg: bytes  # as sent, BOM included

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8

    @property
    def has_bom(self) -> bool:
        return self.msg.startswith(BOM)

    @property
    def text(self) -> str:
        return (self.msg[len(BOM):] if self.has_bom else self.msg).decode("utf-8")


def parse_rfc5424(raw: bytes) -> SyslogMessage:
    """Parse one syslog message; ValueError says what breaks RFC 5424."""
    m = _HEADER.match(raw)
    if m is None:
        raise ValueError(f"not an RFC 5424 message: {raw[:80]!r}")
    pri = int(m["pri"])
    if pri > 191:
        raise ValueError(f"PRI {pri} > 191")
    fields = {k: m[k].decode("ascii") for k in ("ts", "host", "app", "procid", "msgid")}
    for key, limit in _LIMITS.items():
        if len(fields[key]) > limit or any(not 33 <= ord(c) <= 126 for c in fields[key]):
            raise ValueError(f"header field {key} '{fields[key]}' is not 1-{limit} printable ASCII characters")
    if not _TIMESTAMP.match(fields["ts"]):
        raise ValueError(f"TIMESTAMP '{fields['ts']}' is not RFC 3339 as RFC 5424 restricts it")
    return SyslogMessage(pri, int(m["version"]), fields["ts"], fields["host"], fields["app"], fields["procid"],
                         fields["msgid"], m["sd"].decode("utf-8"), m["msg"] or b"")


def split_frames(buffer: bytearray) -> list[bytes]:
    """Take the complete octet-counted frames (MSG-LEN SP MSG) off the front of `buffer`."""
    frames = []
    while True:
        space = buffer.find(b" ")
        if space < 0:
            if len(buffer) > 10:
                raise ValueError(f"no MSG-LEN: {bytes(buffer[:20])!r} (not octet-counting framing)")
            return frames
        head = bytes(buffer[:space])
        if not head.isdigit() or head.startswith(b"0"):
            raise ValueError(f"MSG-LEN {head[:20]!r} is not a non-zero decimal number")
        n = int(head)
        if len(buffer) < space + 1 + n:
            return frames
        frames.append(bytes(buffer[space + 1: space + 1 + n]))
        del buffer[: space + 1 + n]


class SyslogListener:
    def __init__(self, port: int = 0, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.messages: list[SyslogMessage] = []
        self.errors: list[str] = []
        self.peer_certs: list[dict] = []
        self.connections = 0
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", port))
        self._server.listen(16)
        self._server.settimeout(0.05)
        self.port = self._server.getsockname()[1]

    def start(self) -> "SyslogListener":
        self._spawn(self._accept_loop)
        return self

    def __enter__(self) -> "SyslogListener":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._server.close()
        with self._cond:
            conns = list(self._conns)
        for c in conns:
            try:
                c.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(5)
        assert not any(t.is_alive() for t in self._threads), "syslog listener thread did not stop"

    def drop_connections(self) -> None:
        """Close the connections held now (the receiver restarting), keep listening."""
        with self._cond:
            conns, self._conns = list(self._conns), []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def wait_for(self, n: int, timeout: float = 5.0) -> list[SyslogMessage]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.messages) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self.messages)

    # ---- threads ---------------------------------------------------------

    def _spawn(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        t = threading.Thread(target=target, args=args, daemon=True, name="test-syslog")
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.connections += 1
            self._spawn(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            if self.ssl_context is not None:
                try:
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    with self._cond:
                        self.errors.append(f"TLS handshake: {exc}")
                    return
                cert = conn.getpeercert()
                if cert:
                    self.peer_certs.append(cert)
            conn.settimeout(0.05)
            with self._cond:
                self._conns.append(conn)
            buffer = bytearray()
            while not self._stop.is_set():
                try:
                    data = conn.recv(65536)
                except (TimeoutError, socket.timeout, ssl.SSLWantReadError):
                    continue
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                try:
                    frames = split_frames(buffer)
                except ValueError as exc:
                    with self._cond:
                        self.errors.append(str(exc))
                    return
                for raw in frames:
                    try:
                        msg = parse_rfc5424(raw)
                    except ValueError as exc:
                        with self._cond:
                            self.errors.append(str(exc))
                        continue
                    with self._cond:
                        self.messages.append(msg)
                        self._cond.notify_all()
        finally:
            conn.close()
