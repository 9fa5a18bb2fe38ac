"""Runs the API (uvicorn) in a thread of the node process; stopped with the rest of the node."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import uvicorn

from node.api.auth import ApiConfigError, Authenticator
from node.api.queries import Views
from node.audit import AuditLog
from node.config.schema import NodeConfig
from node.metrics import NodeMetrics
from node.store import Store

log = logging.getLogger("ainode.api")


class ApiStartError(OSError):
    """The API's port cannot be bound; the message names api.host/api.port."""


class ApiServer:
    def __init__(self, cfg: NodeConfig, store: Store, audit: AuditLog, base: Path) -> None:
        from node.api.app import create_app

        section = cfg.api
        assert section is not None
        self.host, self.port = section.host, section.port
        self.metrics = NodeMetrics(Views(store, audit.path).queue)
        audit.add_listener(self.metrics.on_record)  # counts from now on: before the node starts receiving
        app = create_app(cfg, store, audit, Authenticator(section, base), self.metrics)
        # log_config=None: uvicorn's lines go through the node's handler (key=value, node/logs.py) rather
        # than a handler of uvicorn's own that printed "WARNING:  Invalid HTTP request received."
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, log_config=None,
                                                     timeout_graceful_shutdown=5))
        self._thread: threading.Thread | None = None
        self._sock = self._bind()  # now: a taken port refuses the start before anything runs

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ApiStartError(exc.errno, f"api: cannot listen on {self.host}:{self.port} ({exc.strerror}); "
                                           "change api.port or stop what uses it") from exc
        sock.listen(64)
        self.port = sock.getsockname()[1]
        return sock

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, name="api",
                                        daemon=True)
        self._thread.start()
        log.info("api listening host=%s port=%d", self.host, self.port)

    def stop(self, timeout: float = 10) -> None:
        """Stop taking requests and let running ones finish (they may still append audit records)."""
        if self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
        self._sock.close()


def build_api(cfg: NodeConfig, store: Store, audit: AuditLog, base: Path) -> ApiServer | None:
    """The API server when the config has an api: section. Secrets are read and the port is bound here:
    ApiConfigError or ApiStartError refuse the node's start with a message naming the key."""
    return None if cfg.api is None else ApiServer(cfg, store, audit, base)


__all__ = ["ApiConfigError", "ApiServer", "ApiStartError", "build_api"]
