"""Reads a study's files in an idle worker process while the study is still arriving.

Reading a 300-slice CT (header parse, pixel bytes) costs a job about 0.8 s of one core after the last
image, and decoding a compressed one (JPEG 2000: 6 s) far more. While a study arrives, the receiver (bound
by the GIL) leaves the other core mostly free, so the node names each new file that some rule could take
(WorkerPool.arrived) to an idle worker, which reads it here, decoding compressed pixel data too, and
load_series takes it from here instead of reading it again.

Reading pauses while a job runs (it would slow the job) and keeps to a memory budget: the oldest files are
dropped first, and files no job took within MAX_AGE_S are dropped too. A file that was not read ahead is
simply read by the job, so nothing here can change a job's result.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from typing import Callable, Iterable

log = logging.getLogger("ainode.run")

MAX_AGE_S = 300.0  # a file read ahead that no job took by then belongs to a study no job will read here
# The reading thread yields the CPU to the receiver and to jobs. Reading a CT slice ahead costs 1-2 ms of
# CPU (mostly pydicom's header parse). With every core receiving (node.receive_processes: 2, 4
# associations) a thread at nice 10 still took about 2 ms a slice and slowed the receive by 10-20%; at
# nice 19 it takes about half that and still reads the slices before the study completes. Not SCHED_IDLE:
# the thread may hold the GIL when a job starts, and at SCHED_IDLE it could wait long for a CPU to let go.
NICE = 19


class ReadAhead:
    """Files read ahead, by path, as `read` returns them: (header, stored pixels or None)."""

    def __init__(self, budget_bytes: int, read: Callable[[str], tuple]) -> None:
        self.budget_bytes = budget_bytes
        self._read = read
        self._queue: deque[str] = deque()
        self._wanted: set[str] = set()  # queued or being read, and not taken since
        self._cache: OrderedDict[str, tuple[tuple, int, float]] = OrderedDict()  # path -> (item, bytes, read at)
        self._bytes = 0
        self._cond = threading.Condition()
        self._paused = False
        self._thread: threading.Thread | None = None
        self.hits = 0  # files taken from here

    def add(self, paths: Iterable[str]) -> None:
        """Queue files to read (when no job runs)."""
        if self.budget_bytes <= 0:
            return
        with self._cond:
            for p in paths:
                if p not in self._wanted and p not in self._cache:
                    self._wanted.add(p)
                    self._queue.append(p)
            self._expire(time.monotonic())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)
                self._thread.start()
            self._cond.notify()

    def pause(self) -> None:
        """A job starts: read nothing more until resume() (a file being read is finished)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    def take(self, path: str) -> tuple | None:
        """The file's (header, pixels) if it was read ahead; it is not kept here after."""
        with self._cond:
            self._wanted.discard(path)  # a read under way is not kept when it ends
            entry = self._cache.pop(path, None)
            if entry is None:
                return None
            self._bytes -= entry[1]
            self.hits += 1
            return entry[0]

    def holds(self, paths: Iterable[str]) -> int:
        """How many of these files are read and waiting."""
        with self._cond:
            return sum(str(p) in self._cache for p in paths)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def _expire(self, now: float) -> None:
        while self._cache:
            path, (_, size, at) = next(iter(self._cache.items()))
            if self._bytes <= self.budget_bytes and now - at < MAX_AGE_S:
                return
            del self._cache[path]
            self._bytes -= size

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)  # this thread only (Linux)
        except OSError:
            pass
        while True:
            with self._cond:
                while self._paused or not self._queue:
                    self._cond.wait()
                path = self._queue.popleft()
                if path not in self._wanted:
                    continue
            try:
                on_disk = os.path.getsize(path)
                if on_disk > self.budget_bytes:  # a multi-frame instance: it could not be kept, and reading
                    with self._cond:  # (and decoding) it would only take the memory for a moment
                        self._wanted.discard(path)
                    continue
                item = self._read(path)
                # Decoded pixels outweigh a compressed file: the budget counts what is held.
                size = max(on_disk, getattr(item[1], "nbytes", 0))
            except Exception as exc:  # noqa: BLE001 - the job reads the file itself and reports its error
                log.debug("read-ahead failed path=%s error=%s", path, type(exc).__name__)
                with self._cond:
                    self._wanted.discard(path)
                continue
            with self._cond:
                if path not in self._wanted:  # taken (and read by the job) meanwhile
                    continue
                self._wanted.discard(path)
                self._cache[path] = (item, size, time.monotonic())
                self._bytes += size
                self._expire(time.monotonic())
