"""Local worker pool: claims jobs from the persistent queue and runs them.

Plugins are loaded once per worker pool and kept warm. A plugin exception
fails its own job with the error recorded; the worker moves on.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Mapping

from node.audit import AuditLog
from node.config.schema import PluginSection
from node.plugin_api import Plugin, StudyInput, load_plugin
from node.receive.spool import Spool
from node.results.build import AlgorithmInfo, build_results
from node.results.validate import validate_with_dciodvfy
from node.run.series_loader import load_series
from node.store import DispatchItem, Store
from node.store.models import Job

log = logging.getLogger("ainode.run")


class JobError(Exception):
    pass


class WorkerPool:
    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        spool: Spool,
        results_dir: Path,
        plugin_config: Mapping[str, PluginSection],
        *,
        workers: int = 1,
        validate: bool = True,
        poll_interval_s: float = 0.2,
    ) -> None:
        self.store = store
        self.audit = audit
        self.spool = spool
        self.results_dir = Path(results_dir)
        self.plugin_config = plugin_config
        self.n_workers = workers
        self.validate = validate and shutil.which("dciodvfy") is not None
        if validate and not self.validate:
            log.warning("dciodvfy not found: results are sent without IOD validation "
                        "(apt-get install dicom3tools to enable it)")
        self.poll_interval_s = poll_interval_s
        self._plugins: dict[str, Plugin] = {}
        self._plugin_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.busy = 0

    def plugin(self, name: str) -> Plugin:
        with self._plugin_lock:
            if name not in self._plugins:
                section = self.plugin_config.get(name)
                self._plugins[name] = load_plugin(name, section.options if section else None)
            return self._plugins[name]

    def start(self) -> None:
        for i in range(self.n_workers):
            t = threading.Thread(target=self._loop, name=f"worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop claiming jobs and wait for running ones. False if a job is still running."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim_job()
            if job is None:
                self._stop.wait(self.poll_interval_s)
                continue
            self.busy += 1
            try:
                self.execute(job)
            finally:
                self.busy -= 1

    def execute(self, job: Job) -> None:
        t0 = time.time()
        timings: dict[str, float] = {"queue_wait_s": round(t0 - job.created_at, 3)}
        self.audit.append("job-start", study_uid=job.study_uid, job_id=job.id, plugin=job.plugin,
                          rule=job.rule, attempt=job.attempts, series_uids=job.series_uids)
        log.info("job start job_id=%d plugin=%s attempt=%d", job.id, job.plugin, job.attempts)
        version = None
        try:
            plugin = self.plugin(job.plugin)
            version = plugin.version
            t = time.perf_counter()
            volumes, sources = [], {}
            for series_uid in job.series_uids:
                paths = [i.path for i in self.store.instances_of(series_uid)]
                vol, headers = load_series(paths)
                volumes.append(vol)
                sources[series_uid] = headers
            timings["load_s"] = round(time.perf_counter() - t, 3)

            t = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix=f"ainode-job{job.id}-") as scratch:
                result = plugin.run(StudyInput(job.study_uid, volumes, Path(scratch), plugin.options))
            timings["plugin_s"] = round(time.perf_counter() - t, 3)
            del volumes

            t = time.perf_counter()
            objects = build_results(result, sources, AlgorithmInfo(name=plugin.name, version=plugin.version))
            paths = self._write_objects(job, objects)
            timings["build_s"] = round(time.perf_counter() - t, 3)
        except Exception as exc:  # noqa: BLE001 - a plugin failure fails only its job
            error = f"{type(exc).__name__}: {exc}"
            log.error("job failed job_id=%d plugin=%s error=%s", job.id, job.plugin, error)
            log.debug("job failed traceback:\n%s", traceback.format_exc())
            timings["total_s"] = round(time.time() - t0, 3)
            self.store.job_failed(job.id, error[:2000], timings)
            self.audit.append("job-end", "failure", study_uid=job.study_uid, job_id=job.id, plugin=job.plugin,
                              plugin_version=version, error=error[:500])
            return

        items = [
            DispatchItem(destination=dest, kind=o.kind, sop_class_uid=o.sop_class_uid,
                         sop_instance_uid=o.sop_instance_uid, path=str(p))
            for dest in job.destinations
            for o, p in zip(objects, paths)
        ]
        timings["total_s"] = round(time.time() - t0, 3)
        self.store.job_results_built(job.id, plugin.version, result.summary, timings, items)
        self.audit.append(
            "job-end", study_uid=job.study_uid, job_id=job.id, plugin=plugin.name, plugin_version=plugin.version,
            outputs=[{"kind": o.kind, "sop_instance_uid": o.sop_instance_uid,
                      "series_uid": o.series_instance_uid} for o in objects],
            summary=result.summary, timings=timings,
        )
        log.info("job results built job_id=%d objects=%d timings=%s", job.id, len(objects), timings)

    def _write_objects(self, job: Job, objects) -> list[Path]:  # type: ignore[no-untyped-def]
        out_dir = self.results_dir / job.study_uid / f"job-{job.id}"
        paths = []
        for o in objects:
            path = out_dir / f"{o.kind}-{o.sop_instance_uid}.dcm"
            tmp = self.spool.temp_path()
            o.dataset.save_as(tmp, enforce_file_format=True)
            if self.validate:
                errors = validate_with_dciodvfy(tmp)
                if errors:
                    tmp.unlink(missing_ok=True)
                    raise JobError(f"{o.kind} {o.sop_instance_uid} failed IOD validation: {errors[0]}"
                                   + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
            self.spool.commit(tmp, path)
            paths.append(path)
        return paths
