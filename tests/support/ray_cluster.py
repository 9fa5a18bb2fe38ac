"""A local Ray cluster for tests and benchmarks: `ray start --head --block` on loopback, stopped by SIGTERM.

Not `ray stop`: that stops every Ray cluster of the user on the machine, other tests' included. The
blocking `ray start` owns its processes (one process group of its own) and drains and stops them on SIGTERM.
Every port is picked free, and the temp dir is short (Ray's Unix socket paths must stay under 108 bytes).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[2]


class RayCluster:
    def __init__(self, num_cpus: int = 1) -> None:
        self.num_cpus = num_cpus
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.log_path = self.temp_dir / "ray-start.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "RayCluster":
        ray = Path(sys.executable).with_name("ray")
        low = free_port()
        while low <= self.port <= low + 200:
            low = free_port()
        names = ("node-manager-port", "object-manager-port", "dashboard-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
        picked: list[int] = []
        while len(picked) < len(names):  # none inside the worker port range: Ray refuses to start then
            p = free_port()
            if not low <= p <= low + 200 and p not in picked and p != self.port:
                picked.append(p)
        ports = {f"--{k}": str(p) for k, p in zip(names, picked)}
        cmd = [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
               f"--num-cpus={self.num_cpus}", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
               f"--temp-dir={self.temp_dir}", f"--object-store-memory={200 * 2**20}",
               f"--min-worker-port={low}", f"--max-worker-port={min(low + 200, 65535)}",
               *(f"{k}={v}" for k, v in ports.items())]
        # Actors import the node (and tests.plugins) from this checkout, as the node subprocess does.
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log_path.read_text()
                self.stop()
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{text}")
            if b"Ray runtime started" in self.log_path.read_bytes():
                return self
            time.sleep(0.2)
        text = self.log_path.read_text()
        self.stop()
        raise RuntimeError(f"Ray did not start within {timeout}s:\n{text}")

    def stop(self, timeout: float = 40) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # anything of this cluster still alive
            except ProcessLookupError:
                pass
            self.proc.wait(10)
            self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayCluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
