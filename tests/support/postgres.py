"""A real PostgreSQL (Debian's postgresql-15 binaries) on a free loopback port, for the multi-node tests.

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user, in a temp folder
of its own (chowned to it). Each instance is independent (own data dir, port and socket dir), so
pytest-xdist workers never share one. Tests get a fresh database each (`PostgresServer.new_database`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.support.net import free_port

BIN = Path(os.environ.get("AINODE_PG_BIN", "/usr/lib/postgresql/15/bin"))


class PostgresServer:
    def __init__(self) -> None:
        if not (BIN / "initdb").exists():
            raise RuntimeError(f"no PostgreSQL server binaries in {BIN}: apt-get install postgresql "
                               "(or set AINODE_PG_BIN)")
        # Not under pytest's tmp_path: that is root-only (0700), and the server runs as `postgres`.
        self.dir = Path(tempfile.mkdtemp(prefix="ainode-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        self.started = False

    def _run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        full = ["runuser", "-u", "postgres", "--", *cmd] if self._as_root else list(cmd)
        r = subprocess.run(full, capture_output=True, text=True, timeout=timeout, cwd=self.dir)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def start(self) -> "PostgresServer":
        self._run(str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        try:
            self._run(str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
                      "-t", "60", "-o", opts, "start", timeout=90)
        except Exception:
            self.stop()
            raise
        self.started = True
        return self

    def stop(self) -> None:
        try:
            if self.data.exists():
                subprocess.run((["runuser", "-u", "postgres", "--"] if self._as_root else [])
                               + [str(BIN / "pg_ctl"), "-D", str(self.data), "stop", "-m", "immediate", "-w"],
                               capture_output=True, timeout=60)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        """A plain postgresql:// URL, as a user would write it in storage.database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        p = self.dir / "server.log"
        return p.read_text() if p.exists() else ""

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
