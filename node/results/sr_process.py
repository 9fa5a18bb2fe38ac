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
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

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


def _for_sr(series: Sequence[Dataset]) -> list[Dataset]:
    """The series as the SR process needs it. Pickling 300 whole headers costs about 0.3 s in the worker
    (and a FileDataset carries its file's bytes along); the attributes the SR reads cost a tenth of that."""
    out = [Dataset(series[0])]  # a plain Dataset: its elements, not the file buffer behind them
    for ds in series[1:]:
        stub = Dataset()
        for keyword in CITED:
            if keyword in ds:
                stub[keyword] = ds[keyword]
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


def _ready() -> bool:
    return True


class SrProcess:
    """Call it with build_sr's arguments (as build_results collects them) to start an SR; the function it
    returns waits for the SR."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._start()

    def _start(self) -> None:
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"), initializer=_warm)
        self._warm: Future[bool] = self._pool.submit(_ready)  # starts the process and warms it now

    def warm(self) -> bool:
        """The process has started and imported highdicom (seconds after a worker starts, more on a busy
        machine)."""
        return self._warm.done() and self._warm.exception() is None

    def __call__(self, args: dict[str, Any], path: Path | None = None) -> Callable[[], Dataset | WrittenSr]:
        """With `path`, the process also writes the SR there and hands back a WrittenSr: unpickling the
        Dataset in the worker cost about 0.2 s of its GIL while it built the SEG. If the process fails, the
        SR is built here and returned as a Dataset."""
        from node.results.build import build_sr_from

        if not self.warm():  # a job must never wait for the process to start: build here this time
            return lambda: build_sr_from(args)
        try:
            shipped = {**args, "sources": {uid: _for_sr(series) for uid, series in args["sources"].items()}}
            future: Future[Dataset | WrittenSr] | None = (self._pool.submit(_build, shipped, path)
                                                          if self._pool else None)
        except Exception as exc:  # noqa: BLE001 - a broken pool: build here, and start a new process
            log.warning("SR process unusable; building the SR in the worker error=%s", type(exc).__name__)
            self._restart()
            future = None

        def wait() -> Dataset | WrittenSr:
            if future is None:
                return build_sr_from(args)
            try:
                return future.result()  # the SR's own errors (an unknown segment label, say) are raised here
            except (BrokenProcessPool, pickle.PicklingError) as exc:  # the process died: build here
                log.warning("SR process failed; building the SR in the worker error=%s", type(exc).__name__)
                self._restart()
                return build_sr_from(args)

        return wait

    def _restart(self) -> None:
        self.close()
        self._start()

    def close(self, wait: bool = False) -> None:
        """`wait`: until the process has ended. A worker that is ending waits: its exit removes the
        semaphores of the pool's queues, and a process still starting would fail to open them (a traceback
        on the node's stderr when it is stopped seconds after it started)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.shutdown(wait=wait, cancel_futures=True)
