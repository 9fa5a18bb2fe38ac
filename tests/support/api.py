"""Talking to a node's HTTP API in tests: its config section and plain urllib requests."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

from tests.support.net import free_port, wait_for_port

ADMIN_TOKEN = "admin-token-7f3a9c"
VIEWER_TOKEN = "viewer-token-2b8e41"
IT_PASSWORD = "it-password-5d1c"


def api_config(monkeypatch) -> dict:  # type: ignore[no-untyped-def]
    """An api: section on a free port: tokens 'ops' (admin) and 'dash' (viewer), basic user 'it' (admin)."""
    monkeypatch.setenv("AINODE_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("AINODE_TEST_VIEWER_TOKEN", VIEWER_TOKEN)
    monkeypatch.setenv("AINODE_TEST_IT_PASSWORD", IT_PASSWORD)
    return {"host": "127.0.0.1", "port": free_port(),
            "tokens": [{"name": "ops", "token_env": "AINODE_TEST_ADMIN_TOKEN", "role": "admin"},
                       {"name": "dash", "token_env": "AINODE_TEST_VIEWER_TOKEN", "role": "viewer"}],
            "basic": [{"user": "it", "password_env": "AINODE_TEST_IT_PASSWORD", "role": "admin"}]}


def base_url(node) -> str:  # type: ignore[no-untyped-def]
    port = node.config["api"]["port"]
    assert wait_for_port("127.0.0.1", port, 10), "the API did not listen"
    return f"http://127.0.0.1:{port}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def call(url: str, headers: dict[str, str] | None = None, method: str = "GET",
         body: dict | None = None) -> tuple[int, Any, dict]:
    """(status, body as JSON or text, response headers); HTTP errors are returned, not raised."""
    data = None if body is None else json.dumps(body).encode()
    hdrs_in = {**(headers or {}), **({"Content-Type": "application/json"} if data else {})}
    req = urllib.request.Request(url, data=data, headers=hdrs_in, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            status, raw, hdrs = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), dict(e.headers)
    text = raw.decode("utf-8")
    try:
        return status, json.loads(text), hdrs
    except ValueError:
        return status, text, hdrs
