"""Calls from receive processes into the node process, over an authenticated Unix socket.

A receive process (node.receive_processes > 1) takes associations and writes spool files itself; the
store rows and the audit records stay with the node process, their one writer (the hash chain has one
appender; the group commit batches every association's rows, whichever process took it). Each
association thread gets its own connection, so a call waits only for its own answer.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("ainode.receive")
RUN_PREFIX = "ainode-rx-"


class RemoteError(RuntimeError):
    """The node process raised something that could not be sent back as it was."""


def run_dir() -> Path:
    """A private folder for the socket (a Unix socket path must be short, so in the temp folder), named for
    this process. Folders of node processes that are gone (killed with kill -9: a clean stop removes its
    own) are removed first."""
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(f"{RUN_PREFIX}*"):
        pid = old.name[len(RUN_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and old.stat().st_uid == os.getuid():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{RUN_PREFIX}{os.getpid()}-"))


class RpcServer:
    def __init__(self, targets: Mapping[str, Any], path: Path, authkey: bytes) -> None:
        self.targets = dict(targets)
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        self._listener = Listener(str(self.path), family="AF_UNIX", authkey=authkey)
        os.chmod(self.path, 0o600)
        self._closed = False
        self._conns: list[Connection] = []
        self._conns_lock = threading.Lock()  # each connection is closed once, by whoever takes it off the list
        threading.Thread(target=self._accept, name="receive-rpc", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except (OSError, EOFError, AuthenticationError) as exc:  # closed, or a peer without the authkey
                if self._closed:
                    return
                log.warning("receive rpc connection refused in its handshake error=%s", type(exc).__name__)
                continue
            with self._conns_lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), name="receive-rpc-conn", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        try:
            while True:
                target, method, args, kwargs = conn.recv()
                try:
                    reply = ("ok", getattr(self.targets[target], method)(*args, **kwargs))
                except Exception as exc:  # noqa: BLE001 - the caller refuses the instance with it
                    reply = ("err", exc)
                try:
                    conn.send(reply)
                except Exception:  # noqa: BLE001 - an exception that does not pickle
                    conn.send(("err", RemoteError(f"{type(reply[1]).__name__}: {reply[1]}")))
        except (EOFError, OSError):  # the receive process ended, or closed this association's connection
            pass
        finally:
            self._close_once(conn)

    def _close_once(self, conn: Connection) -> None:
        """Close `conn` unless `close` or this already did. Both used to close it when the node stopped while
        a receive process's connection ended: the second os.close() of that descriptor failed (EBADF), or
        closed whatever file or socket another thread had opened under the same number meanwhile."""
        with self._conns_lock:
            if conn not in self._conns:
                return
            self._conns.remove(conn)
        conn.close()

    def close(self) -> None:
        with self._conns_lock:
            self._closed = True
            conns, self._conns = self._conns, []
        self._listener.close()
        for conn in conns:
            conn.close()
        self.path.unlink(missing_ok=True)


class RpcClient:
    def __init__(self, path: Path, authkey: bytes) -> None:
        self.path, self.authkey = str(path), authkey
        self._local = threading.local()

    def call(self, target: str, method: str, *args: Any, **kwargs: Any) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = Client(self.path, family="AF_UNIX", authkey=self.authkey)
        conn.send((target, method, args, kwargs))
        status, value = conn.recv()
        if status == "err":
            raise value
        return value

    def proxy(self, target: str) -> "Proxy":
        return Proxy(self, target)


class Proxy:
    """`proxy.method(*args)` runs `targets[target].method(*args)` in the node process."""

    def __init__(self, client: RpcClient, target: str) -> None:
        self._client, self._target = client, target

    def __getattr__(self, method: str):  # type: ignore[no-untyped-def]
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self._client.call(self._target, method, *args, **kwargs)
