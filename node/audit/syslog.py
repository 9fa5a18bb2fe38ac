"""RFC 5424 syslog over TCP (RFC 6587 octet counting) or TLS (RFC 5425), from a background thread.

`SyslogForwarder.submit(item)` only puts the item on a bounded queue: it never blocks and never
raises, whatever the receiver does. The thread renders each item to a message body, frames it and
sends it, reconnecting with exponential backoff while the receiver is down. When the queue is full
new items are dropped and counted; the count is logged (never the content, which may name patients).

Header choices (IHE ITI TF-2 3.20, Record Audit Event): PRI facility 10 (authpriv) severity 5
(notice), i.e. <85>; MSGID "IHE+RFC-3881", the value IHE ATNA repositories select audit messages by
(DICOM's schema descends from RFC 3881); no structured data; the XML as MSG, after a UTF-8 BOM as
RFC 5424 6.4 asks for UTF-8 text (atna.include_bom: some older repositories want none).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Generic, TypeVar

log = logging.getLogger("ainode.syslog")

FACILITY_AUTHPRIV = 10
SEVERITY_NOTICE = 5
MSGID_ATNA = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"

T = TypeVar("T")

_WAKE = object()  # put by close() so the sender thread need not wait out its queue timeout


def header_field(value: object, max_len: int) -> str:
    """An RFC 5424 header field: printable US-ASCII without spaces, at most max_len, "-" if empty."""
    text = "".join(c if 33 <= ord(c) <= 126 else "_" for c in str(value))[:max_len]
    return text or "-"


def timestamp(when: datetime | None = None) -> str:
    """RFC 5424 TIMESTAMP in UTC with milliseconds, e.g. 2026-11-25T08:00:00.123Z."""
    when = (when or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rfc5424(body: bytes, *, app_name: str, hostname: str, procid: str | int, msgid: str = MSGID_ATNA,
            facility: int = FACILITY_AUTHPRIV, severity: int = SEVERITY_NOTICE,
            when: datetime | None = None, bom: bool = True) -> bytes:
    """One syslog message: HEADER SP "-" SP MSG (no structured data)."""
    header = " ".join((
        f"<{facility * 8 + severity}>1",
        timestamp(when),
        header_field(hostname, 255),
        header_field(app_name, 48),
        header_field(procid, 128),
        header_field(msgid, 32),
        "-",
    ))
    return header.encode("ascii") + b" " + (BOM if bom else b"") + body


def octet_frame(message: bytes) -> bytes:
    """RFC 6587 3.4.1 / RFC 5425 4.3 octet counting: MSG-LEN SP SYSLOG-MSG."""
    return str(len(message)).encode("ascii") + b" " + message


class SyslogForwarder(Generic[T]):
    """Send rendered items to one syslog receiver, in order, from one background thread.

    `render(item)` runs on that thread and returns the message body (or None to skip the item); an
    exception from it costs that item only. Messages are sent at least once: one interrupted by a
    connection failure is sent again after reconnecting.
    """

    def __init__(self, host: str, port: int, *, render: Callable[[T], bytes | None],
                 ssl_context: ssl.SSLContext | None = None, app_name: str = "ainode",
                 hostname: str | None = None, msgid: str = MSGID_ATNA, bom: bool = True,
                 queue_size: int = 10000, connect_timeout_s: float = 5.0, send_timeout_s: float = 10.0,
                 backoff_initial_s: float = 0.2, backoff_max_s: float = 30.0,
                 report_interval_s: float = 60.0, name: str = "syslog") -> None:
        self.host, self.port = host, port
        self.render = render
        self.ssl_context = ssl_context
        self.app_name = app_name
        self.hostname = hostname or socket.gethostname()
        self.procid = str(os.getpid())
        self.msgid = msgid
        self.bom = bom
        self.connect_timeout_s = connect_timeout_s
        self.send_timeout_s = send_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.report_interval_s = report_interval_s
        self._queue: queue.Queue[T] = queue.Queue(maxsize=queue_size)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._unfinished = 0  # submitted and not yet sent, skipped or dropped
        self.sent = 0
        self.dropped = 0  # queue full, closed, or left over when close() gave up
        self.skipped = 0  # render returned None or failed
        self._dropped_reported = 0
        self._last_report = 0.0
        self._down_since: float | None = None
        self._last_down_log = 0.0
        self._closing = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # ---- caller side ---------------------------------------------------

    def submit(self, item: T) -> bool:
        """Queue `item`; False (and counted) when it was dropped. Never blocks, never raises."""
        with self._lock:
            if self._closing.is_set():
                self.dropped += 1
                return False
            try:
                self._queue.put_nowait(item)
            except queue.Full:
                self.dropped += 1
                return False
            self._unfinished += 1
            return True

    __call__ = submit

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything submitted so far is sent (or skipped/dropped). True if it was."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._unfinished:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
            return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking items, send what is queued for at most `timeout_s`, then drop the rest."""
        with self._lock:
            self._closing.set()
        try:
            self._queue.put_nowait(_WAKE)  # type: ignore[arg-type]
        except queue.Full:
            pass  # the thread is busy with the queue anyway
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join(self.connect_timeout_s + 1)
        if self.dropped:
            log.warning("syslog %s: closed; %d audit messages dropped in this run, not delivered (%d sent); "
                        "the local audit log holds every record", self.address, self.dropped, self.sent)

    # ---- sender thread -------------------------------------------------

    def _done(self, n: int = 1) -> None:
        with self._idle:
            self._unfinished -= n
            if self._unfinished <= 0:
                self._idle.notify_all()

    def _run(self) -> None:
        frame: bytes | None = None
        delay = self.backoff_initial_s
        try:
            while not self._abort.is_set():
                self._report()
                if frame is None:
                    try:
                        item = self._queue.get(timeout=0.05 if self._closing.is_set() else 0.5)
                    except queue.Empty:
                        if self._closing.is_set():
                            return
                        continue
                    if item is _WAKE:
                        continue
                    frame = self._frame(item)
                    if frame is None:
                        self._done()
                        continue
                if self._send(frame):
                    frame, delay = None, self.backoff_initial_s
                    self.sent += 1
                    self._done()
                else:
                    self._abort.wait(delay)
                    delay = min(delay * 2, self.backoff_max_s)
        finally:
            self._disconnect()
            left = (1 if frame is not None else 0) + self._drain()
            if left:
                with self._lock:
                    self.dropped += left
                self._done(left)

    def _drain(self) -> int:
        n = 0
        while True:
            try:
                n += self._queue.get_nowait() is not _WAKE
            except queue.Empty:
                return n

    def _frame(self, item: T) -> bytes | None:
        try:
            body = self.render(item)
        except Exception as exc:  # noqa: BLE001 - one bad item must not stop the sender
            self.skipped += 1
            log.error("syslog %s: could not render an audit message (%s); it is skipped",
                      self.address, type(exc).__name__)
            return None
        if body is None:
            self.skipped += 1
            return None
        return octet_frame(rfc5424(body, app_name=self.app_name, hostname=self.hostname, procid=self.procid,
                                   msgid=self.msgid, bom=self.bom))

    def _send(self, frame: bytes) -> bool:
        if self._sock is None and not self._connect():
            return False
        assert self._sock is not None
        if self._peer_closed():
            self._disconnect()
            if not self._connect():
                return False
        try:
            self._sock.sendall(frame)
            return True
        except OSError as exc:
            self._unreachable(f"send failed: {exc}")
            self._disconnect()
            return False

    def _connect(self) -> bool:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout_s)
        except OSError as exc:
            self._unreachable(str(exc))
            return False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.send_timeout_s)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            hint = " (check atna.ca_file / cert_file and the receiver's certificate)" \
                if isinstance(exc, ssl.SSLError) else ""
            self._unreachable(f"TLS handshake failed: {exc}{hint}")
            return False
        self._sock = sock
        if self._down_since is not None:
            log.warning("syslog %s: connected again after %.0f s; sending queued audit messages",
                        self.address, time.monotonic() - self._down_since)
        else:
            log.info("syslog %s: connected (%s)", self.address, "tls" if self.ssl_context else "tcp")
        self._down_since = None
        return True

    def _peer_closed(self) -> bool:
        """A syslog receiver never sends: a readable socket means it closed (or reset) the connection.

        Checking before each send catches a receiver that went away while idle, so the next message
        is not written into a dead connection and lost.
        """
        assert self._sock is not None
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            if not readable:
                return False
            if isinstance(self._sock, ssl.SSLSocket):
                self._sock.setblocking(False)
                try:
                    return self._sock.recv(1) == b""
                except ssl.SSLWantReadError:
                    return False
                finally:
                    self._sock.settimeout(self.send_timeout_s)
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (OSError, ValueError):
            return True

    def _disconnect(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _unreachable(self, why: str) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            self._last_down_log = now
            log.warning("syslog %s: audit record repository unreachable (%s); audit messages are queued "
                        "(up to %d) and sent when it is back. Check atna.host/atna.port and that the "
                        "receiver listens.", self.address, why, self._queue.maxsize)
        elif now - self._last_down_log >= self.report_interval_s:
            self._last_down_log = now
            log.warning("syslog %s: still unreachable after %.0f s (%s); %d audit messages waiting",
                        self.address, now - self._down_since, why, self._queue.qsize())

    def _report(self) -> None:
        now = time.monotonic()
        if self.dropped == self._dropped_reported or now - self._last_report < self.report_interval_s:
            return
        with self._lock:
            new, self._dropped_reported = self.dropped - self._dropped_reported, self.dropped
        self._last_report = now
        log.warning("syslog %s: %d audit messages dropped (queue of %d full while the receiver was slow "
                    "or down; %d dropped in all). The local audit log holds every record.",
                    self.address, new, self._queue.maxsize, self.dropped)
