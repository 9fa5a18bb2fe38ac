"""Decode (and `prepare`) the next queued job's series while the current job runs, in the worker process;
its JPEG 2000, JPEG-LS and JPEG slices in processes of their own, one per CPU, at a lower priority
(decode_pool.BACKGROUND_NICE), and its files read and converted in threads at that priority too
(series_loader: beside them at equal priority, a job's postprocess took 4x as long on 2 cores).

Not in a thread of the worker process, as they once were: that decoded at one core's pace (an H100 host's
JPEG 2000 burst waited 7.3 s a series for it, against 0.77 s with 16 processes), and the decoder holds the
GIL for part of each slice (a pure-Python thread beside one ran 1.5x slower).

The node only hints which job is likely next; it does not claim it. If another job is claimed instead (a
stat study arrived, another worker took it), the prefetched input waits for its job, and is dropped when
the worker is hinted another, so prefetching never changes the queue order. A prefetch that fails is
dropped too: the job then loads its input itself and reports the error in its own stage.
"""

from __future__ import annotations

import logging
import threading

from node.run.decode_pool import BACKGROUND_NICE, processes_for
from node.run.job_process import JobSpec, LoadedInput, PluginCache, load_input
from node.run.read_ahead import ReadAhead

log = logging.getLogger("ainode.run")


class _Pending:
    def __init__(self, spec: JobSpec, plugin, ahead: ReadAhead | None) -> None:  # type: ignore[no-untyped-def]
        self.spec = spec
        self.result: LoadedInput | None = None
        self.thread = threading.Thread(target=self._load, args=(plugin, ahead), name="prefetch", daemon=True)
        self.thread.start()

    def _load(self, plugin, ahead: ReadAhead | None) -> None:  # type: ignore[no-untyped-def]
        try:
            files = max((len(paths) for paths in self.spec.series.values()), default=0)
            self.result = load_input(self.spec, plugin, ahead, decode_processes=processes_for(files),
                                     nice=BACKGROUND_NICE)
        except Exception as exc:  # noqa: BLE001 - the job reports it when it loads its input itself
            log.info("prefetch failed job_id=%d error=%s", self.spec.job_id, type(exc).__name__)

    def is_for(self, spec: JobSpec) -> bool:
        return self.spec.job_id == spec.job_id and self.spec.series == spec.series


class Prefetcher:
    def __init__(self, plugins: PluginCache, ahead: ReadAhead | None = None) -> None:
        self.plugins = plugins
        self.ahead = ahead  # files read while their study arrived (node/run/read_ahead.py)
        self._pending: _Pending | None = None
        self._lock = threading.Lock()  # start() runs in the pipe reader, take() in the job thread

    def start(self, spec: JobSpec) -> None:
        """Begin loading `spec`'s input in the background (one job ahead at most)."""
        with self._lock:
            if self._pending is not None and self._pending.is_for(spec):
                return
            # Only a plugin already loaded is asked to prepare: loading one here would race the running
            # job. A dropped load is not waited for: it ends on its own and its memory is freed then.
            self._pending = _Pending(spec, self.plugins.loaded(spec.plugin), self.ahead)

    def take(self, spec: JobSpec) -> LoadedInput | None:
        """The prefetched input of `spec`, if that is the job that was prefetched; else None."""
        with self._lock:
            pending = self._pending
            if pending is None or not pending.is_for(spec):
                # Keep a prefetch for another job: its hint can arrive before this job is taken.
                return None
            self._pending = None
        pending.thread.join()
        return pending.result
