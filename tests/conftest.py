import os
import shutil
from pathlib import Path

import pytest

# Debian's DCMTK leaves Nagle's algorithm on unless told otherwise: ~40 ms per C-STORE on loopback.
os.environ.setdefault("TCP_NODELAY", "1")
# The suite runs four tests at a time on two cores (pytest -n 4), each with torch in its node's worker or in
# the test itself. OpenMP's threads spin while they wait for each other, so under that oversubscription the
# torch-heavy tests took several times their time alone (ct_nodule's fixture: 88 s against 13 s). One thread
# per process: the same tests used a third less CPU (4 min 7 s -> 2 min 47 s). Node processes inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.support.node_proc import NodeProcess
from tests.support.orthanc import OrthancServer


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} not found: apt-get install {package} (.ci/run installs it)")
    return path


@pytest.fixture
def node_factory(tmp_path):
    """Start nodes as subprocesses; every one is stopped at the end of the test."""
    started: list[NodeProcess] = []

    def make(config=None, name="node", start=True) -> NodeProcess:
        n = NodeProcess(tmp_path / name, config)
        started.append(n)
        return n.start() if start else n

    yield make
    for n in started:
        try:
            n.stop()
        finally:
            n.kill()


@pytest.fixture
def orthanc(tmp_path):
    """A real Orthanc on free loopback ports (AE ORTHANC), stopped at the end of the test."""
    with OrthancServer(tmp_path / "orthanc", aet="ORTHANC") as o:
        yield o


@pytest.fixture
def test_plugins(monkeypatch):
    """Lets node subprocesses import tests.plugins (plugins configured with `entry: tests.plugins...`)."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


@pytest.fixture(scope="session")
def postgres_server():
    """One real PostgreSQL per test process (xdist worker), stopped and removed at the end."""
    from tests.support.postgres import PostgresServer

    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(postgres_server) -> str:
    """A fresh PostgreSQL database for this test (postgresql:// URL)."""
    return postgres_server.new_database()


@pytest.fixture(autouse=True)
def _store_on_postgresql(request):
    """AINODE_TEST_STORE=postgresql: every Store a test opens in-process on a SQLite file opens a fresh
    PostgreSQL database instead (one per file), so the Store-level unit tests run against both back ends.
    Node subprocesses, and a Store a test opens on a node subprocess's existing file, are not redirected."""
    if os.environ.get("AINODE_TEST_STORE") != "postgresql":
        yield
        return
    from node.store.db import Store

    server = request.getfixturevalue("postgres_server")
    databases: dict[str, str] = {}
    original = Store.__init__

    def init(self, url, **kw):  # type: ignore[no-untyped-def]
        # A file that exists already was made by a node subprocess: the test reads what that node stored.
        if url.startswith("sqlite:///") and (url in databases or not Path(url.removeprefix("sqlite:///")).exists()):
            url = databases.setdefault(url, server.new_database())
        original(self, url, **kw)

    Store.__init__ = init
    try:
        yield
    finally:
        Store.__init__ = original
