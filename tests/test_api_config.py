"""The api: section: validation names the key, missing secrets and a taken port refuse the start."""

import socket

import pytest
from pydantic import ValidationError

from node.api.config import ApiSection


def test_api_section_validation():
    with pytest.raises(ValidationError, match="exactly one of token_env or token_file"):
        ApiSection(tokens=[{"name": "a", "token_env": "X", "token_file": "f", "role": "admin"}])
    with pytest.raises(ValidationError, match="exactly one of password_env or password_file"):
        ApiSection(basic=[{"user": "it"}])
    with pytest.raises(ValidationError, match="at least one entry"):
        ApiSection()
    with pytest.raises(ValidationError, match="unique.*: it"):
        ApiSection(tokens=[{"name": "it", "token_env": "X"}], basic=[{"user": "it", "password_env": "Y"}])
    with pytest.raises(ValidationError, match="role"):
        ApiSection(tokens=[{"name": "a", "token_env": "X", "role": "root"}])


def test_missing_secret_and_taken_port_refuse_start(node_factory, monkeypatch, tmp_path):
    monkeypatch.delenv("AINODE_TEST_NO_SUCH_TOKEN", raising=False)
    n = node_factory({"api": {"port": 1, "tokens": [{"name": "ops", "token_env": "AINODE_TEST_NO_SUCH_TOKEN"}]}},
                     name="nosecret", start=False)
    with pytest.raises(RuntimeError, match=r"api.tokens\[0\].token_env: environment variable "
                                           "AINODE_TEST_NO_SUCH_TOKEN is not set"):
        n.start()
    (tmp_path / "ops.token").write_text("t0ken\n")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        n = node_factory({"api": {"port": port, "tokens": [{"name": "ops", "token_file": str(tmp_path / "ops.token")}]}},
                         name="taken", start=False)
        with pytest.raises(RuntimeError, match=rf"api: cannot listen on 127.0.0.1:{port}.*change api.port"):
            n.start()


def test_the_api_server_s_own_lines_are_structured_like_the_node_s(node_factory, monkeypatch):
    """uvicorn's default logging config printed 'WARNING:  Invalid HTTP request received.' on its own
    handler; IT's log tooling expects every line in the node's key=value form."""
    from tests.support.api import api_config, base_url
    from tests.support.wait import wait_until

    node = node_factory({"api": api_config(monkeypatch)})
    base_url(node)  # listening
    with socket.create_connection(("127.0.0.1", node.config["api"]["port"]), timeout=10) as s:
        s.sendall(b"\x00\x01 this is not HTTP\r\n\r\n")
        s.recv(1024)

    def lines() -> list[str]:
        return [line for line in node.log_path.read_text(errors="replace").splitlines()
                if "Invalid HTTP request" in line]

    wait_until(lines, 10, "uvicorn's warning")
    assert all(line.startswith("ts=") and "level=WARNING logger=uvicorn.error " in line for line in lines()), lines()
