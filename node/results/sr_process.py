"""A warm second process that builds a job's SR while the worker process builds its SEG.

Both builds are pure-Python highdicom and pydicom work under one GIL, so in one process they take the sum
of their times; in two processes, on a machine with two or more cores, they overlap. The SR needs the
SEGs' UIDs only, which are derived before either is built (node/results/build.py). The process is spawned
when the worker starts and imports highdicom then, so no job pays for its start. It dies with the worker
process (PR_SET_PDEATHSIG). If it fails or dies, the job builds its SR in its own process instead.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from node.lifeline import die_with_parent

if TYPE_CHECKING:
    from node.results.build import WrittenSr

log = logging.getLogger("ainode.results")


def _warm() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops the workers, which take this along
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent()
    from node.run.heap import keep_freed_memory

    keep_freed_memory()
    from node.results import iod_lookup  # importing node.results imports highdicom and installs the cache

    iod_lookup.preload()  # the import and the standard's tables: seconds, paid once


# What highdicom's SR reads of a cited image (its reference, the evidence list, and its check that the
# image is an image); the first image of each series goes whole (patient and study modules come from it).
CITED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows", "Columns",
         "SamplesPerPixel", "PixelRepresentation", "NumberOfFrames")


_CITED_TAGS = [tag_for_keyword(keyword) for keyword in CITED]


def _for_sr(series: Sequence[Dataset]) -> list[Dataset]:
    """The series as the SR process needs it. Pickling 300 whole headers costs about 0.3 s in the worker
    (and a FileDataset carries its file's bytes along); the attributes the SR reads cost a tenth of that.
    They are copied as read (get_item: a raw element stays raw, and is converted where the SR reads it):
    converting them here by keyword took 0.021 s of the worker's time a 300-slice job, against 0.006 s."""
    out = [Dataset(series[0])]  # a plain Dataset: its elements, not the file buffer behind them
    for ds in series[1:]:
        stub = Dataset()
        for tag in _CITED_TAGS:
            elem = ds.get_item(tag)
            if elem is not None:
                stub[tag] = elem
        out.append(stub)
    return out


def _build(args: dict[str, Any], path: Path | None) -> Dataset | WrittenSr:
    from node.results.build import WrittenSr, build_sr_from

    sr = build_sr_from(args)
    if path is None:
        return sr
    try:
        sr.save_as(path, enforce_file_format=True)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return WrittenSr(str(sr.SOPClassUID), str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID), path)


class _Dead(Exception):
    """The SR process ended, or its pipe broke."""


def _serve(conn: Connection) -> None:
    """The SR process: warm up, say so, then build each SR the worker sends until the pipe closes.

    A plain pipe rather than a ProcessPoolExecutor: the pool's queues are named POSIX semaphores, which the
    worker's resource tracker has to remove. A worker killed mid-job (past run.shutdown_grace_s) left the
    tracker a "leaked semaphore objects" warning on the node's stderr at every such stop, and the node
    killed outright left the five files in /dev/shm for good. A pipe is only two file descriptors."""
    _warm()
    try:
        conn.send(("ready", 0, None))
        while True:
            try:
                seq, args, path = conn.recv()
            except EOFError:  # the worker closed its end: it is ending
                return
            try:
                reply: tuple[str, int, Any] = ("ok", seq, _build(args, path))
            except Exception as exc:  # noqa: BLE001 - the SR's own errors go back to fail the job
                reply = ("error", seq, exc)
            try:
                conn.send(reply)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:  # an error that will not pickle
                conn.send(("error", seq, RuntimeError(f"{type(reply[2]).__name__}: {reply[2]} ({exc})")))
    except OSError:  # the worker went away mid-send (BrokenPipeError): nothing is waiting for us
        return


class SrProcess:
    """Call it with build_sr's arguments (as build_results collects them) to start an SR; the function it
    returns waits for the SR. One SR at a time, as a worker runs one job at a time."""

    def __init__(self) -> None:
        self._proc: BaseProcess | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._seq = 0
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child,), name="ainode-sr", daemon=True)
        self._proc.start()  # it imports highdicom now, so no job pays for that
        child.close()
        self._ready = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def warm(self) -> bool:
        """The process has started and imported highdicom (seconds after a worker starts, more on a busy
        machine)."""
        return self.wait_ready(0)

    def wait_ready(self, timeout: float) -> bool:
        if not self._ready and self._conn is not None:
            try:
                if self._conn.poll(timeout):
                    self._ready = self._conn.recv()[0] == "ready"
            except (EOFError, OSError):  # it died while starting: jobs build their SRs in the worker
                log.warning("SR process ended while starting; SRs are built in the worker exit_code=%s",
                            self._proc.exitcode if self._proc else None)
                self.close()
        return self._ready

    def __call__(self, args: dict[str, Any], path: Path | None = None) -> Callable[[], Dataset | WrittenSr]:
        """With `path`, the process also writes the SR there and hands back a WrittenSr: unpickling the
        Dataset in the worker cost about 0.2 s of its GIL while it built the SEG. If the process fails, the
        SR is built here and returned as a Dataset."""
        from node.results.build import build_sr_from

        if not self.warm():  # a job must never wait for the process to start: build here this time
            return lambda: build_sr_from(args)
        self._seq += 1
        seq = self._seq
        try:
            shipped = {**args, "sources": {uid: _for_sr(series) for uid, series in args["sources"].items()}}
            self._send((seq, shipped, path))
        except Exception as exc:  # noqa: BLE001 - a broken pipe: build here, and start a new process
            log.warning("SR process unusable; building the SR in the worker error=%s", type(exc).__name__)
            self._restart()
            return lambda: build_sr_from(args)

        def wait() -> Dataset | WrittenSr:
            try:
                kind, value = self._receive(seq)
            except _Dead as exc:  # the process died (a kernel OOM kill, say): build here
                log.warning("SR process failed; building the SR in the worker error=%s", exc)
                self._restart()
                return build_sr_from(args)
            if kind == "error":
                raise value  # the SR's own errors (an unknown segment label, say) fail the job
            return value

        return wait

    def _send(self, msg: tuple[int, dict[str, Any], Path | None]) -> None:
        assert self._conn is not None
        self._conn.send(msg)

    def _receive(self, seq: int) -> tuple[str, Any]:
        """The reply to request `seq`; earlier replies nobody waited for are dropped."""
        conn, proc = self._conn, self._proc
        if conn is None or proc is None:
            raise _Dead("closed")
        while True:
            try:
                while not conn.poll(0.5):
                    if not proc.is_alive():
                        raise _Dead(f"exit code {proc.exitcode}")
                kind, got, value = conn.recv()
            except (EOFError, OSError) as exc:
                raise _Dead(type(exc).__name__) from exc
            if got == seq:
                return kind, value

    def _restart(self) -> None:
        self.close()
        self._start()

    def close(self, wait: bool = False) -> None:
        """`wait`: until the process has ended (a worker that is ending waits, so no SR process outlives it
        by even a moment)."""
        conn, proc = self._conn, self._proc
        self._conn = self._proc = None
        self._ready = False
        if conn is not None:
            conn.close()  # the process reads EOF and returns
        if proc is not None:
            if wait:
                proc.join(5)
            if proc.is_alive():
                proc.kill()
                if wait:
                    proc.join(5)
