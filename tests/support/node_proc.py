"""Runs the node as a real subprocess, as hospital IT would: `ainode serve --config FILE`."""

from __future__ import annotations

import os
import signal

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.support.net import free_port, wait_for_port


class NodeProcess:
    def __init__(self, workdir: Path, config: dict[str, Any] | None = None, *, ae_title: str = "AINODE",
                 prefault: bool = False) -> None:
        """`prefault`: keep the node's default run.prefault_mb (benchmarks measure the node as configured).
        Tests turn it off: each worker would hold about 1 GB from its start, and four tests at once each start
        nodes with workers."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.ae_title = ae_title
        cfg: dict[str, Any] = {
            # One receive process unless a test asks for more: the default (auto, one per CPU) would start
            # another process per node on the CI machine, and which one takes an association would vary.
            "node": {"ae_title": ae_title, "host": "127.0.0.1", "port": self.port, "receive_processes": 1},
            "storage": {"root": str(self.workdir / "var"), "min_free_mb": 50},
            "assemble": {"quiet_period_s": 1.0, "poll_interval_s": 0.2},
            "run": {} if prefault else {"prefault_mb": 0},
        }
        for key, value in (config or {}).items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        cfg["node"]["port"] = self.port
        self.config = cfg
        self.config_path = self.workdir / "node.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = self.workdir / "node.log"
        self.proc: subprocess.Popen | None = None

    @property
    def var(self) -> Path:
        return self.workdir / "var"

    @property
    def audit_path(self) -> Path:
        return self.var / "audit.jsonl"

    def audit_records(self) -> list[dict]:
        import json

        if not self.audit_path.exists():
            return []
        # The node may be writing a record now: a line without its newline is not complete yet.
        *complete, _partial = self.audit_path.read_text().split("\n")
        return [json.loads(line) for line in complete if line.strip()]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=self.workdir)

    def start(self, timeout: float = 60) -> "NodeProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.workdir,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            if wait_for_port("127.0.0.1", self.port, 0.5):
                return self
        self.kill()
        raise RuntimeError(f"node did not listen within {timeout}s:\n{self.log_path.read_text()}")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM and wait; the exit code (0 is a clean shutdown)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            self.proc.send_signal(signal.SIGUSR1)  # the node writes every thread's stack to its log (cli.py)
            time.sleep(1)
            self.kill()
            stacks = self.log_path.read_text(errors="replace").splitlines()[-150:]
            raise RuntimeError(f"node did not stop within {timeout}s of SIGTERM; its log ends:\n"
                               + "\n".join(stacks)) from exc
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> "NodeProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()
