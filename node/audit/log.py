"""Append-only, hash-chained audit log (JSON lines).

Each record carries the SHA-256 of the previous record and its own hash over
its canonical JSON, so an edit, a removal or a reordering breaks the chain at
the first affected line. A sidecar `<log>.head` holds the last sequence number
and hash, so truncating the tail is detected too. It is rewritten in place after every record as one
fixed-width write inside the file's first 512 bytes (one sector: a crash leaves the old or the new head,
never half of each), not by temp file and rename, which cost a millisecond per record on the receive path.

This is the one log that may hold patient identifiers: it is the record a
security review asks for. Ordinary logs must not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
HEAD_BYTES = 128  # {"seq": …, "hash": 64 hex} padded with blanks: always one write within one sector

Listener = Callable[[dict[str, Any]], None]

log = logging.getLogger("ainode.audit")


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def record_hash(record_without_hash: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(record_without_hash)).hexdigest()


def head_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".head")


class AuditLog:
    """Thread-safe appender. One process owns a log file at a time.

    Listeners (e.g. the ATNA syslog forwarder) get a copy of each record after it is in the file,
    outside the lock; they must not block. An exception from a listener is logged and swallowed:
    forwarding must never cost an audit record or fail the caller. Listeners may see records of
    concurrent appends in a different order than the file holds them (each carries its `seq`).
    """

    def __init__(self, path: Path, *, node_ae: str = "", forward: Listener | None = None) -> None:
        self.path = Path(path)
        self.node_ae = node_ae
        self._listeners: list[Listener] = [forward] if forward is not None else []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._seq, self._prev = self._read_tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        self._head_fd = -1

    def _read_tail(self) -> tuple[int, str]:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return 0, GENESIS
        last = b""
        with open(self.path, "rb") as fh:
            # Read backwards until a full final line is found.
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            block = 4096
            data = b""
            while size > 0:
                step = min(block, size)
                size -= step
                fh.seek(size)
                data = fh.read(step) + data
                lines = data.rstrip(b"\n").split(b"\n")
                if len(lines) > 1 or size == 0:
                    last = lines[-1]
                    break
        try:
            rec = json.loads(last)
            return int(rec["seq"]), str(rec["hash"])
        except (ValueError, KeyError) as exc:
            raise RuntimeError(
                f"audit log {self.path}: the last line is not a valid audit record; "
                f"run 'ainode audit verify' and move the damaged file aside before starting"
            ) from exc

    def append(self, event: str, outcome: str = "success", **fields: Any) -> dict[str, Any]:
        """Write one record. Fields should be UIDs, AE titles, addresses and states."""
        with self._lock:
            rec: dict[str, Any] = {
                "seq": self._seq + 1,
                "ts": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
                "event": event,
                "outcome": outcome,
                "node": self.node_ae,
                **{k: v for k, v in fields.items() if v is not None},
                "prev": self._prev,
            }
            rec["hash"] = record_hash(rec)
            os.write(self._fd, canonical(rec) + b"\n")
            self._seq, self._prev = rec["seq"], rec["hash"]
            self._write_head()
        for listener in self._listeners:
            try:
                listener(dict(rec))
            except Exception as exc:  # noqa: BLE001 - a listener must never break an append
                log.warning("audit listener %r failed on a %s record: %s (the record is in the log)",
                            listener, event, type(exc).__name__)
        return rec

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(record)` after every later append (see the class docstring)."""
        self._listeners = [*self._listeners, listener]  # copy-on-write: appends iterate without the lock

    def remove_listener(self, listener: Listener) -> None:
        self._listeners = [x for x in self._listeners if x is not listener]

    def _write_head(self) -> None:
        first = self._head_fd < 0
        if first:
            self._head_fd = os.open(head_path(self.path), os.O_WRONLY | os.O_CREAT, 0o640)
        head = json.dumps({"seq": self._seq, "hash": self._prev}).encode()
        os.pwrite(self._head_fd, head.ljust(HEAD_BYTES - 1) + b"\n", 0)  # JSON allows trailing blanks
        if first:  # a head of an older node version may be longer or shorter
            os.ftruncate(self._head_fd, HEAD_BYTES)

    def sync(self) -> None:
        with self._lock:
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
            if self._head_fd >= 0:
                os.fsync(self._head_fd)
                os.close(self._head_fd)
                self._head_fd = -1
