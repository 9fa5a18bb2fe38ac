"""A warm worker process that runs jobs for the node, watched for time and memory.

The node keeps one per worker. The process loads plugins once and serves jobs over a pipe. The
node stops it (SIGKILL) when a job runs past run.timeout_s or its memory passes
run.memory_limit_mb, fails that job, and starts a fresh process for the next one. A process that
dies on its own (a segfault, the kernel's OOM killer) fails its job the same way.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Callable, Mapping

from node.config.schema import PluginSection
from node.cpus import JOBS_MEMORY_SHARE, physical_memory_mb
from node.lifeline import die_with_parent
from node.run.gpu_decode import Setting as GpuDecode
from node.run.heap import keep_freed_memory, prefault

from node.run.job_process import JobOutput, JobSpec, PluginCache, execute_job
from node.run.prefetch import Prefetcher
from node.run.read_ahead import ReadAhead
from node.run.series_loader import read_file_decoded

log = logging.getLogger("ainode.run")

_PAGE = os.sysconf("SC_PAGE_SIZE")
PREFETCH_POLL_S = 0.5


class JobFailed(Exception):
    """The job failed; `restart` says the worker process is gone or unfit and must be replaced."""

    def __init__(self, message: str, restart: bool = False) -> None:
        super().__init__(message)
        self.restart = restart


class Abandoned(Exception):
    """The node is stopping and did not wait for the job to finish."""


def default_memory_limit_mb(workers: int) -> int:
    return int(physical_memory_mb() * JOBS_MEMORY_SHARE / max(1, workers))


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _child_main(conn, sections: Mapping[str, PluginSection], preload: list[str], log_level: str,  # type: ignore[no-untyped-def]
                models_dir: Path | None, device: str, env: Mapping[str, str], sr_process: bool = False,
                read_ahead_bytes: int = 0, gpu_decode: GpuDecode = False, prefault_bytes: int = 0) -> None:
    os.environ.update(env)  # CUDA_VISIBLE_DEVICES: set before anything initialises CUDA
    # The node handles SIGTERM/SIGINT (systemd and Ctrl-C signal the whole group) and stops this process
    # itself; and if the node is killed outright, this process must not outlive it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent()
    kept = keep_freed_memory()  # a job's volume reuses the last job's pages (heap.py says why)
    from node.logs import setup_logging

    setup_logging(log_level)
    sr_builder = None
    if sr_process and preload:  # a worker with no rule plugin builds nothing
        from node.results.sr_process import SrProcess

        # multiprocessing refuses children to a daemonic process. The node made this one daemonic so that
        # its own exit never waits for it; in here the flag only blocks the SR process, which dies with
        # this one (PR_SET_PDEATHSIG), so it is cleared.
        mp.current_process().daemon = False
        sr_builder = SrProcess()
    plugins = PluginCache(sections, models_dir, device, gpu_decode)
    ahead = ReadAhead(read_ahead_bytes, functools.partial(read_file_decoded, max_bytes=read_ahead_bytes))
    prefetcher = Prefetcher(plugins, ahead)
    plugins.preload(preload)
    if kept and preload and prefault_bytes:  # the first job's pages, touched now rather than during it
        log.debug("prefaulted mb=%d seconds=%.2f", prefault_bytes // 2**20, prefault(prefault_bytes))
    conn.send(("ready", None))  # warm: the node starts timing jobs from here, not from the spawn
    runs: queue.Queue = queue.Queue()

    def read() -> None:
        # Prefetch hints arrive while a job runs, so a thread reads the pipe and the main thread runs jobs.
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = None
            if msg is None:
                runs.put(None)
                return
            kind, spec = msg
            if kind == "prefetch":
                prefetcher.start(spec)
            elif kind == "read":  # files of a study still arriving (spec: their paths)
                ahead.add(spec)
            else:
                runs.put(spec)

    threading.Thread(target=read, name="pipe-reader", daemon=True).start()
    while True:
        spec = runs.get()
        if spec is None:
            if sr_builder is not None:
                sr_builder.close(wait=True)
            return
        ahead.pause()  # reading ahead would slow the job
        loaded = prefetcher.take(spec)
        try:
            out = execute_job(spec, plugins, lambda stage: conn.send(("stage", stage)), loaded, sr_builder, ahead)
            del loaded
            conn.send(("done", out))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the node
            log.debug("job failed traceback:\n%s", traceback.format_exc())
            conn.send(("error", (f"{type(exc).__name__}: {exc}", isinstance(exc, MemoryError))))
        finally:
            ahead.resume()


class PluginProcess:
    def __init__(self, name: str, sections: Mapping[str, PluginSection], preload: list[str],
                 log_level: str = "INFO", models_dir: Path | None = None, device: str = "auto",
                 env: Mapping[str, str] | None = None, sr_process: bool = False, read_ahead_mb: int = 0,
                 gpu_decode: GpuDecode = False, prefault_mb: int = 0) -> None:
        """`read_ahead_mb`: how much of arriving studies the idle process may hold (node/run/read_ahead.py);
        `gpu_decode`: run.gpu_decode; `prefault_mb`: memory touched at start for the first job (heap.py)."""
        self.name = name
        self.env = dict(env or {})
        self._args = (dict(sections), list(preload), log_level, models_dir, device, self.env, sr_process,
                      read_ahead_mb * 2**20, gpu_decode, prefault_mb * 2**20)
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self._warm = False  # the process has imported and preloaded its plugins

    def start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_child_main, args=(child, *self._args), name=self.name, daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent
        self._warm = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def stop(self, timeout: float = 5.0) -> None:
        if self._proc is None:
            return
        try:
            self._conn.send(None)
            self._proc.join(timeout)
        except OSError:  # the process is already gone
            pass
        self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def ready(self, timeout: float) -> bool:
        """True once the process is warm (torch imported, plugins preloaded), waiting up to `timeout`.

        The pool claims no job before, so a fresh process's start-up (seconds on a loaded machine) never
        counts against a job's run.timeout_s. A process that is gone counts as ready: run() replaces it.
        """
        if self._warm or self._proc is None or not self._proc.is_alive():
            return True
        try:
            if self._conn.poll(timeout):
                kind, _ = self._conn.recv()
                self._warm = kind == "ready"
                if self._warm:
                    log.info("worker ready name=%s worker_pid=%s", self.name, self.pid)
        except (EOFError, OSError):
            return True  # died while starting: run() notices and replaces it
        return self._warm

    def read_ahead(self, paths: list[str]) -> None:
        """Have the process read these files (of a study still arriving) while it has no job."""
        if self._conn is None or not self._warm:
            return
        try:
            self._conn.send(("read", paths))
        except OSError:
            pass  # the process is gone; the next job notices

    def _await_warm(self, limit_s: float, abandon: Callable[[], bool]) -> None:
        """Wait for a process started for this job (after a crash or kill) to be warm; its start is not the job's time."""
        deadline = time.monotonic() + limit_s
        while not self.ready(0.1):
            if abandon():
                self.kill()
                raise Abandoned()
            if time.monotonic() > deadline:
                self.kill()
                raise JobFailed(f"worker process did not start within {limit_s:g} s", restart=True)
        if self._proc is None or not self._proc.is_alive():
            raise JobFailed("worker process died while starting (see the node's log for the plugin's error)",
                            restart=True)

    def run(self, spec: JobSpec, *, timeout_s: float, memory_limit_mb: int,
            on_stage: Callable[[str], None], abandon: Callable[[], bool],
            next_job: Callable[[], JobSpec | None] | None = None) -> JobOutput:
        """Run `spec`. While it runs, `next_job` is asked (every PREFETCH_POLL_S until it names one) for
        the job likely to come next, whose input the process then loads in the background."""
        if self._proc is None or not self._proc.is_alive():
            self.restart()
        self._await_warm(max(60.0, timeout_s), abandon)
        limit = memory_limit_mb * 2**20
        deadline = time.monotonic() + timeout_s
        try:
            self._conn.send(("run", spec))
        except OSError as exc:
            raise JobFailed(f"worker process unreachable: {exc}", restart=True) from exc
        hint_at = time.monotonic()
        while True:
            if next_job is not None and time.monotonic() >= hint_at:
                hint = next_job()
                hint_at = time.monotonic() + PREFETCH_POLL_S
                if hint is not None:
                    next_job = None
                    try:
                        self._conn.send(("prefetch", hint))
                    except OSError:
                        pass  # the process is gone; noticed below
            if self._conn.poll(0.1):
                try:
                    kind, payload = self._conn.recv()
                except (EOFError, OSError):
                    kind, payload = "died", None
                    self._proc.join(5)
                if kind == "stage":
                    on_stage(payload)
                    continue
                if kind == "done":
                    return payload
                if kind == "error":
                    message, out_of_memory = payload
                    raise JobFailed(message, restart=out_of_memory)
            if not self._proc.is_alive():
                code = self._proc.exitcode or 0
                how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                hint = " (the kernel's out-of-memory killer?)" if code == -signal.SIGKILL else ""
                raise JobFailed(f"worker process died ({how}){hint}", restart=True)
            if time.monotonic() > deadline:
                self.kill()
                raise JobFailed(f"timed out after {timeout_s:g} s (run.timeout_s); worker process stopped",
                                restart=True)
            rss = _rss_bytes(self._proc.pid)
            if rss > limit:
                self.kill()
                raise JobFailed(f"worker process used {rss // 2**20} MB, over run.memory_limit_mb "
                                f"({memory_limit_mb} MB); stopped", restart=True)
            if abandon():
                self.kill()
                raise Abandoned()
