"""node/receive/rpc.py: the receive processes' calls into the node process, over a Unix socket in a private
folder, answered only for a caller with the authkey."""

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from multiprocessing import AuthenticationError
from pathlib import Path

import pytest

from node.receive import rpc
from node.receive.rpc import RpcClient, RpcServer

pytestmark = pytest.mark.timeout(60)  # a server whose accept thread died would leave a call waiting for ever


class Target:
    def add(self, a: int, b: int = 0) -> int:
        return a + b

    def fail(self) -> None:
        raise ValueError("refused by the node process")


@pytest.fixture
def private(monkeypatch):
    """A temp folder of this test's own, with a short path: a Unix socket path may have 107 bytes at most,
    and pytest's tmp_path under xdist is longer."""
    folder = tempfile.mkdtemp(prefix="rpc-", dir="/tmp")
    monkeypatch.setattr(rpc.tempfile, "tempdir", folder)
    yield Path(folder)
    shutil.rmtree(folder, ignore_errors=True)


def test_calls_round_trip_and_raise_what_the_node_process_raised(private):
    key = secrets.token_bytes(32)
    server = RpcServer({"t": Target()}, rpc.run_dir() / "receive.sock", key)
    try:
        assert oct(server.path.stat().st_mode & 0o777) == "0o600"
        proxy = RpcClient(server.path, key).proxy("t")
        assert proxy.add(2, b=3) == 5
        with pytest.raises(ValueError, match="refused by the node process"):
            proxy.fail()
    finally:
        server.close()


def test_a_caller_without_the_authkey_is_refused_and_the_server_serves_on(private):
    key = secrets.token_bytes(32)
    server = RpcServer({"t": Target()}, rpc.run_dir() / "receive.sock", key)
    try:
        for _ in range(2):  # the accept thread used to die at the first (AuthenticationError is no OSError)
            with pytest.raises(AuthenticationError):
                RpcClient(server.path, secrets.token_bytes(32)).proxy("t").add(1)
        assert RpcClient(server.path, key).proxy("t").add(1) == 1
    finally:
        server.close()


def test_folders_of_node_processes_that_are_gone_are_removed(private):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    left = private / f"{rpc.RUN_PREFIX}{gone}-abc"  # a node killed with kill -9 left it
    left.mkdir()
    (left / "receive.sock").touch()
    alive = private / f"{rpc.RUN_PREFIX}{os.getppid()}-def"  # another node, still running
    alive.mkdir()
    mine = rpc.run_dir()
    assert mine.name.startswith(f"{rpc.RUN_PREFIX}{os.getpid()}-") and mine.is_dir()
    assert not left.exists() and alive.exists()
    assert sorted(p.name for p in Path(private).iterdir()) == sorted([alive.name, mine.name])


def test_a_connection_is_closed_once_when_it_ends_as_the_server_closes(private, monkeypatch):
    """The serving thread (its peer gone) and close() both closed the connection: the second os.close() failed
    with EBADF, or closed a descriptor another thread had just been given."""
    from multiprocessing.connection import Connection

    closes: list[int] = []
    inner = Connection.close
    monkeypatch.setattr(Connection, "close", lambda self: (closes.append(id(self)), inner(self))[1])
    key = secrets.token_bytes(32)
    server = RpcServer({"t": Target()}, rpc.run_dir() / "receive.sock", key)
    client = RpcClient(server.path, key)
    assert client.proxy("t").add(1) == 1
    served = list(server._conns)
    client._local.conn.close()  # the peer goes: the serving thread closes its end
    for _ in range(100):
        if not server._conns:
            break
        time.sleep(0.02)
    server.close()
    assert [closes.count(id(c)) for c in served] == [1]
