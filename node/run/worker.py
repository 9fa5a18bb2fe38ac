"""Local worker pool: claims jobs from the persistent queue and runs each in a warm worker process.

The node process keeps the store and the audit log (their only writer); the worker process does the
heavy work (load, plugin, build). A job that fails, hangs or exhausts memory fails alone.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Callable, Mapping, Protocol

from node.audit import AuditLog
from node.config.schema import FORWARD, PluginSection, Source
from node.cpus import THREADS_ENV, usable_cpus, worker_thread_env
from node.monitor.records import record_agreements
from node.priors.config import PriorsSpec
from node.priors.retrieve import PriorRetriever
from node.receive.spool import Spool
from node.run.gpu_decode import Setting as GpuDecode
from node.run.job_process import JobOutput, JobSpec
from node.run.plugin_process import Abandoned, JobFailed, PluginProcess, default_memory_limit_mb
from node.results.fallback import FALLBACK_KINDS
from node.run.forward import Forwarder, ForwardError
from node.run.slots import WorkerSlot
from node.store import DispatchItem, InstanceMeta, Store
from node.store.models import Job

log = logging.getLogger("ainode.run")

DEFAULT_ACCEPTS = frozenset({"SEG", "SR"})
READ_AHEAD_QUEUE = 4096  # files waiting to be handed to one worker: the newest are kept
READ_AHEAD_STUDIES = 64  # studies remembered with the worker that reads them ahead


class Runner(Protocol):
    """What runs a slot's jobs: a local PluginProcess, or a Ray actor (node/run/ray_executor.py RayRunner)."""

    name: str

    @property
    def pid(self) -> int | None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def restart(self) -> None: ...
    def ready(self, timeout: float) -> bool: ...
    def run(self, spec: JobSpec, *, timeout_s: float, memory_limit_mb: int, on_stage: Callable[[str], None],
            abandon: Callable[[], bool], next_job: Callable[[], JobSpec | None] | None = None) -> JobOutput: ...


class WorkerPool:
    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        spool: Spool,
        results_dir: Path,
        plugin_config: Mapping[str, PluginSection],
        *,
        slots: list[WorkerSlot] | None = None,
        workers: int = 1,
        timeout_s: float = 1800,
        memory_limit_mb: int | None = None,
        preload: list[str] | None = None,
        validate: bool = True,
        poll_interval_s: float = 0.2,
        log_level: str = "INFO",
        models_dir: Path | None = None,
        device: str = "auto",
        routine_max_wait_s: float | None = None,
        gpu_memory_mb: Mapping[str, int] | None = None,
        report_kinds: Mapping[str, str] | None = None,
        rule_priors: Mapping[str, PriorsSpec] | None = None,
        sources: Mapping[str, Source] | None = None,
        node_ae: str = "AINODE",
        forwarder: Forwarder | None = None,
        accepts: Mapping[str, frozenset[str]] | None = None,
        max_key_images: int = 1,
        shadow_of: Mapping[str, str] | None = None,
        runners: Callable[[WorkerSlot, list[str]], Runner] | None = None,
        sr_process: bool = False,
        read_ahead_mb: int = 0,
        gpu_decode: GpuDecode = False,
        prefault_mb: int = 0,
        could_take: Callable[[InstanceMeta], frozenset[str]] | None = None,
    ) -> None:
        """`slots` (node.run.slots.plan_slots) say which worker processes run and which jobs each takes;
        without them, `workers` CPU workers take every job. `gpu_memory_mb` is each GPU plugin's estimate.
        `report_kinds` maps RIS destination names to their kind ("ORU" or "FHIR"). `rule_priors`: the rules
        whose jobs get the patient's prior studies, fetched from `sources` as `node_ae`. `accepts` says which
        objects each PACS destination takes (a viewer without SEG gets a GSPS or key images instead).
        `runners` makes each slot's worker from (slot, plugins to preload): by default a local PluginProcess;
        node/run/ray_executor.py makes Ray actors with the same interface. `sr_process`: each local worker
        builds SRs in a second process while it builds the SEG (node/results/sr_process.py). `read_ahead_mb`
        and `could_take` (the plugins whose rules could take an instance's series): an idle local worker
        reads the files of a study while it arrives (arrived(), node/run/read_ahead.py). `gpu_decode`:
        run.gpu_decode, for local workers (Ray actors get it from `runners`). `prefault_mb`: memory each local
        worker touches once at start, for its first job (node/run/heap.py); half its memory limit at most."""
        self.rule_priors = dict(rule_priors or {})
        self.shadow_of = dict(shadow_of or {})  # shadow rule -> primary rule: built, never dispatched
        self.priors = PriorRetriever(spool.root / ".priors", sources or {}, node_ae, audit)
        self.report_kinds = dict(report_kinds or {})
        self.forwarder = forwarder  # the built-in `plugin: forward` action
        self.accepts = dict(accepts or {})  # destination -> what it takes (SEG, SR, GSPS, SC)
        self.max_key_images = max_key_images
        self.routine_max_wait_s = routine_max_wait_s
        self.store = store
        self.audit = audit
        self.spool = spool
        self.results_dir = Path(results_dir)
        self.slots = slots or [WorkerSlot(f"ainode-worker-{i}", {}, None, None) for i in range(workers)]
        self.gpu_memory_mb = dict(gpu_memory_mb or {})
        self.timeout_s = timeout_s
        self.memory_limit_mb = memory_limit_mb or default_memory_limit_mb(len(self.slots))
        self.validate = validate and shutil.which("dciodvfy") is not None
        if validate and not self.validate:
            log.warning("dciodvfy not found: results are sent without IOD validation "
                        "(apt-get install dicom3tools to enable it)")
        self.poll_interval_s = poll_interval_s
        # The files a worker holds count against its memory limit: a quarter of it at most.
        ahead_mb = min(read_ahead_mb, self.memory_limit_mb // 4) if could_take else 0
        prefault_mb = min(prefault_mb, self.memory_limit_mb // 2)

        self._cpus = usable_cpus()
        threads = worker_thread_env(len(self.slots)) if runners is None else {}  # each local worker's CPUs
        if threads:
            log.info("worker threads workers=%d cpus=%d threads_each=%s", len(self.slots), self._cpus,
                     threads[THREADS_ENV])

        def local(slot: WorkerSlot, warm: list[str]) -> Runner:
            return PluginProcess(slot.name, dict(plugin_config), warm, log_level, models_dir, device,
                                 {**threads, **slot.env},
                                 sr_process=sr_process, read_ahead_mb=ahead_mb, gpu_decode=gpu_decode,
                                 prefault_mb=prefault_mb)

        make = runners or local
        self._processes = [make(slot, [p for p in preload or [] if slot.may_run(p)]) for slot in self.slots]
        self._running: set[int] = set()  # jobs claimed by this pool and not yet ended
        self._prefetching: dict[int, int] = {}  # slot index -> job id it prefetches
        self._busy: set[int] = set()  # slot indexes running a job
        self.could_take = could_take if ahead_mb and any(hasattr(p, "read_ahead") for p in self._processes) else None
        # (study UID, path) of the files to hand over, per slot
        self._ahead: list[deque[tuple[str, str]]] = [deque(maxlen=READ_AHEAD_QUEUE) for _ in self.slots]
        self._ahead_slot: OrderedDict[str, int] = OrderedDict()  # study UID -> slot reading it ahead
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wakeups = [threading.Event() for _ in self.slots]  # one per slot loop: wake() rouses them all
        self.on_results: Callable[[], None] | None = None  # called when a job's results are recorded (dispatch)
        # Associations being received on, over all receive processes: while there are as many as CPUs, the
        # receive can use every core and files are not handed over to be read ahead (_hand_over).
        self.receiving: Callable[[], int] | None = None
        self._abandon = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self, clear_priors: bool = True) -> None:
        """`clear_priors`: False when a live peer shares the spool (its jobs' priors are in use)."""
        if clear_priors:
            self.priors.clear()  # a crash's leftovers: no job runs yet
        for i, (slot, proc) in enumerate(zip(self.slots, self._processes)):
            proc.start()
            t = threading.Thread(target=self._loop, args=(i, slot, proc), name=slot.name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop claiming jobs and wait for running ones; after `timeout`, stop them and queue them again
        (without using up an attempt). False if a job had to be cut off."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        clean = not any(t.is_alive() for t in self._threads)
        self._abandon.set()
        for t in self._threads:
            t.join(10)
        for proc in self._processes:
            proc.stop()
        return clean

    def arrived(self, meta: InstanceMeta) -> None:
        """A new instance is spooled: the worker reading its study ahead (an idle one that may run a plugin
        whose rule could take the series) is handed the file at its next poll."""
        if self.could_take is None:
            return
        plugins = self.could_take(meta)
        if not plugins:
            return
        with self._lock:
            index = self._ahead_slot.get(meta.study_uid)
            if index is None:
                fits = [i for i, s in enumerate(self.slots) if any(s.may_run(p) for p in plugins)]
                if not fits:
                    return
                index = min(fits, key=lambda i: (i in self._busy, i in self._ahead_slot.values(), i))
                self._ahead_slot[meta.study_uid] = index
                if len(self._ahead_slot) > READ_AHEAD_STUDIES:
                    self._ahead_slot.popitem(last=False)
            self._ahead[index].append((meta.study_uid, meta.path))

    def _hand_over(self, index: int, proc: Runner) -> None:
        if self.receiving is not None and self.receiving() >= self._cpus:
            return  # held until fewer associations send: reading ahead would take CPU the receive can use
        with self._lock:
            paths = [path for _, path in self._ahead[index]]
            self._ahead[index].clear()
        if paths:
            proc.read_ahead(paths)  # type: ignore[attr-defined] - could_take is set only for runners that have it

    def _forget(self, study_uid: str) -> None:
        """A job of the study started: its job reads the files not handed over yet, so they are dropped (read
        later, they would be read for nothing and held until read_ahead.MAX_AGE_S)."""
        with self._lock:
            self._ahead_slot.pop(study_uid, None)
            for queue in self._ahead:
                if any(study == study_uid for study, _ in queue):
                    kept = [item for item in queue if item[0] != study_uid]
                    queue.clear()
                    queue.extend(kept)

    def wake(self) -> None:
        """Jobs were queued: claim now rather than at the next poll."""
        for event in self._wakeups:
            event.set()

    def _results_recorded(self) -> None:
        if self.on_results is not None:
            self.on_results()

    def _admit(self, slot: WorkerSlot) -> tuple[Callable[[Job], bool], list[int]]:
        """A claim's admission test for `slot`: reserves the job's GPU memory on the slot's GPU if it fits."""
        reserved: list[int] = []

        def admit(job: Job) -> bool:
            if slot.gpu is None:
                return True
            mb = self.gpu_memory_mb.get(job.plugin, 0)
            if not slot.gpu.try_reserve(mb):
                return False
            reserved.append(mb)
            return True

        return admit, reserved

    def _loop(self, index: int, slot: WorkerSlot, proc: Runner) -> None:
        while not self._stop.is_set():
            if not proc.ready(self.poll_interval_s):
                continue  # a Ray actor not placed yet: claim nothing it could not run
            admit, reserved = self._admit(slot)
            self._wakeups[index].clear()  # a wake after this point makes the wait below return at once
            try:
                job = self.store.claim_job(self.routine_max_wait_s, may_run=slot.may_run, admit=admit)
            except Exception:
                for mb in reserved:
                    slot.gpu.release(mb)  # type: ignore[union-attr]
                raise
            if job is None:
                self._hand_over(index, proc)
                self._wakeups[index].wait(self.poll_interval_s)
                continue
            self._forget(job.study_uid)
            with self._lock:
                self._running.add(job.id)
                self._busy.add(index)
                self._prefetching.pop(index, None)
            try:
                self.execute(job, proc, lambda: self._next_for(index, slot, job.id))
            except Abandoned:
                self.store.release_job(job.id)
                self.audit.append("job-end", "interrupted", study_uid=job.study_uid, job_id=job.id,
                                  plugin=job.plugin, reason="node stopping; queued again for the next start")
                log.warning("job cut off by shutdown job_id=%d; queued again", job.id)
                return
            except Exception:  # noqa: BLE001 - a store or disk error must not end the worker thread
                log.exception("job handling failed job_id=%d", job.id)
            finally:
                for mb in reserved:
                    slot.gpu.release(mb)  # type: ignore[union-attr]
                with self._lock:
                    self._running.discard(job.id)
                    self._busy.discard(index)

    def _next_for(self, index: int, slot: WorkerSlot, current: int) -> Job | None:
        """The queued job this slot will most likely run next (not claimed): its input is prefetched."""
        try:
            upcoming = self.store.peek_jobs(self.routine_max_wait_s)
        except Exception:  # noqa: BLE001 - prefetch is an optimisation only
            return None
        with self._lock:
            taken = self._running | {j for i, j in self._prefetching.items() if i != index}
            for job in upcoming:
                if job.id != current and job.id not in taken and slot.may_run(job.plugin):
                    self._prefetching[index] = job.id
                    return job
        return None

    def _spec(self, job: Job) -> JobSpec:
        fallbacks = frozenset(k for d in job.destinations for k in self.accepts.get(d, ()) if k in FALLBACK_KINDS)
        return JobSpec(job_id=job.id, study_uid=job.study_uid, plugin=job.plugin,
                       series={uid: [i.path for i in self.store.instances_of(uid)] for uid in job.series_uids},
                       temp_dir=str(self.spool.tmp), validate=self.validate, fallbacks=fallbacks,
                       max_key_images=self.max_key_images)

    def execute(self, job: Job, proc: Runner, upcoming: Callable[[], Job | None] | None = None) -> None:
        t0 = time.time()
        timings: dict[str, float] = {"queue_wait_s": round(t0 - job.created_at, 3)}
        if job.plugin == FORWARD:
            self._forward(job, timings, t0)
            return
        spec, wanted = self._spec(job), self.rule_priors.get(job.rule)
        first = next((paths[0] for paths in spec.series.values() if paths), None)
        priors = (self.priors.retrieve(job.id, job.study_uid, first, wanted, self._abandon.is_set)
                  if wanted and first else None)
        if priors is not None and self._abandon.is_set():
            self.priors.release(job.id)
            raise Abandoned()  # stopped mid-fetch: queued again, not failed for want of priors
        if priors is not None:
            spec = dataclasses.replace(spec, priors=priors.series)
            timings.update(priors.timings())
        self.audit.append("job-start", study_uid=job.study_uid, job_id=job.id, plugin=job.plugin,
                          rule=job.rule, attempt=job.attempts, series_uids=job.series_uids, worker=proc.name,
                          **({"priors_source": wanted.source, **priors.audit_fields()} if priors else {}))
        log.info("job start job_id=%d plugin=%s attempt=%d worker=%s worker_pid=%s", job.id, job.plugin,
                 job.attempts, proc.name, proc.pid)
        if priors is not None and priors.error:
            if wanted.required:  # type: ignore[union-attr] - priors is only set with wanted
                self._failed(job, f"priors required (rules.*.priors.required) but not fetched: {priors.missing}",
                             timings, t0)
                return
            log.warning("job runs without priors job_id=%d: %s", job.id, priors.missing)
        try:
            out = proc.run(spec, timeout_s=self.timeout_s, memory_limit_mb=self.memory_limit_mb,
                           on_stage=lambda stage: log.info("job stage job_id=%d stage=%s", job.id, stage),
                           abandon=self._abandon.is_set,
                           next_job=(lambda: (j := upcoming()) and self._spec(j)) if upcoming else None)
            timings.update(out.timings)
            paths = self._commit(job, out)
        except JobFailed as exc:
            if exc.restart:
                proc.restart()
                self.spool.remove_scratch(job.id)  # its process is gone; what it wrote there is not kept
            self._failed(job, str(exc), timings, t0)
            return
        except OSError as exc:
            self._failed(job, f"cannot store results: {exc}", timings, t0)
            return
        finally:
            if priors is not None:
                self.priors.release(job.id)

        items = []
        shadow = job.rule in self.shadow_of
        for dest in [] if shadow else job.destinations:
            report = self.report_kinds.get(dest)  # a RIS gets one message per job, made from the SR
            for f, p in zip(out.files, paths):
                if (f.kind == "SR") if report else (f.kind in self.accepts.get(dest, DEFAULT_ACCEPTS)):
                    items.append(DispatchItem(destination=dest, kind=report or f.kind, sop_class_uid=f.sop_class_uid,
                                              sop_instance_uid=f.sop_instance_uid, path=str(p)))
        timings["total_s"] = round(time.time() - t0, 3)
        if not self.store.job_results_built(job.id, out.plugin_version, out.summary, timings, items,
                                            output=out.stats, shadow=shadow):
            self._lost(job)
            return
        self.audit.append(
            "job-end", study_uid=job.study_uid, job_id=job.id, plugin=job.plugin,
            plugin_version=out.plugin_version, **({"shadow_of": self.shadow_of[job.rule]} if shadow else {}),
            output_stats=out.stats and {"model": out.stats["model"], "scanner": out.stats["scanner"],
                                        "finding_count": out.stats["finding_count"]},
            outputs=[{"kind": f.kind, "sop_instance_uid": f.sop_instance_uid, "series_uid": f.series_uid}
                     for f in out.files],
            model=out.model, summary=out.summary, timings=timings,
        )
        log.info("job results built job_id=%d objects=%d timings=%s", job.id, len(out.files), timings)
        self._results_recorded()
        if self.shadow_of and out.stats is not None:
            self._agreement(job)

    def _agreement(self, job: Job) -> None:
        """Shadow mode: once both the shadow and the primary job of a study have outputs, record agreement."""
        try:
            made = record_agreements(self.store, job.id, self.shadow_of)
        except Exception:  # noqa: BLE001 - monitoring must not fail the job
            log.exception("shadow agreement not recorded job_id=%d", job.id)
            return
        for a in made:
            self.audit.append("shadow-agreement", study_uid=a.study_uid, shadow_job_id=a.shadow_job_id,
                              primary_job_id=a.primary_job_id, shadow_model=a.shadow_model,
                              primary_model=a.primary_model, counts_equal=bool(a.counts_equal),
                              max_rel_diff=a.max_rel_diff)
            log.info("shadow agreement shadow_job_id=%d primary_job_id=%d counts_equal=%s max_rel_diff=%s",
                     a.shadow_job_id, a.primary_job_id, bool(a.counts_equal), a.max_rel_diff)

    def _forward(self, job: Job, timings: dict, t0: float) -> None:
        """The built-in forward action (node/run/forward.py): no plugin, no worker process."""
        self.audit.append("job-start", study_uid=job.study_uid, job_id=job.id, plugin=job.plugin, rule=job.rule,
                          attempt=job.attempts, series_uids=job.series_uids, worker="node")
        if self.forwarder is None:
            self._failed(job, "forward is not available in this node", timings, t0)
            return
        try:
            items, summary, extra = self.forwarder.build(job)
        except (ForwardError, OSError) as exc:
            self._failed(job, str(exc), timings, t0)
            return
        timings.update(extra)
        timings["total_s"] = round(time.time() - t0, 3)
        if not self.store.job_results_built(job.id, "builtin", summary, timings, items):
            self._lost(job)
            return
        by_dest: dict[str, int] = {}
        for i in items:
            by_dest[i.destination] = by_dest.get(i.destination, 0) + 1
        self.audit.append("job-end", study_uid=job.study_uid, job_id=job.id, plugin=job.plugin, summary=summary,
                          forwarded=by_dest, timings=timings)
        log.info("forward job built job_id=%d objects=%d", job.id, len(items))
        self._results_recorded()

    def _lost(self, job: Job) -> None:
        """The job was taken over by another node (this one stalled past run.takeover_after_s): its run
        there counts, this one's results are not recorded (their UIDs are the same, so nothing duplicates)."""
        self.audit.append("job-end", "interrupted", study_uid=job.study_uid, job_id=job.id, plugin=job.plugin,
                          reason="taken over by another node; results of this run not recorded")
        log.warning("job taken over by another node job_id=%d; results of this run not recorded", job.id)

    def _failed(self, job: Job, error: str, timings: dict, t0: float) -> None:
        log.error("job failed job_id=%d plugin=%s error=%s", job.id, job.plugin, error)
        timings["total_s"] = round(time.time() - t0, 3)
        if not self.store.job_failed(job.id, error[:2000], timings):
            self._lost(job)
            return
        self.audit.append("job-end", "failure", study_uid=job.study_uid, job_id=job.id, plugin=job.plugin,
                          error=error[:500])

    def _commit(self, job: Job, out: JobOutput) -> list[Path]:
        """Move the worker's synced temp files into the results folder, durably."""
        out_dir = self.results_dir / job.study_uid / f"job-{job.id}"
        paths = []
        for f in out.files:
            path = out_dir / f"{f.kind}-{f.sop_instance_uid}.dcm"
            self.spool.commit(Path(f.temp_path), path)
            paths.append(path)
        return paths
