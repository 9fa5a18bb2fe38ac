import os
import shutil
from pathlib import Path

import pytest

# Debian's DCMTK leaves Nagle's algorithm on unless told otherwise: ~40 ms per C-STORE on loopback.
os.environ.setdefault("TCP_NODELAY", "1")

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
