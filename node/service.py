"""Wires receive → assemble → route → run → dispatch into one running node."""

from __future__ import annotations

import functools
import logging
import threading
import time
from pathlib import Path

from node.assemble import Assembler
from node.api.server import build_api
from node.audit import AuditLog
from node.audit.forward import build_atna_forwarder
from node.config import LoadedConfig
from node.config.tls import config_dir, server_context, with_resolved_tls
from node.dispatch import Dispatcher
from node.maintain import Purger, RequestHandler, reconcile
from node.maintain.instances import Liveness
from node.models.lock import verify_models
from node.monitor.watch import DriftWatch
from node.receive import Spool, StoreSCP
from node.receive.accept_turns import AcceptTurns
from node.receive.processes import ReceiveProcesses
from node.receive.rpc import run_dir
from node.ris.config import resolve_paths
from node.route import Router
from node.route.rules import could_take
from node.deid import Deidentifier, PseudonymMap, load_key
from node.deid.returns import ReturnedResults
from node.run.forward import Forwarder
from node.run.slots import plan_slots, plugin_needs
from node.run.worker import WorkerPool
from node.store import Store

log = logging.getLogger("ainode.service")


def _with_base(deid, base):  # type: ignore[no-untyped-def]
    """DeidSettings with a relative key_file made relative to the config file's folder."""
    if deid.key_file is None or deid.key_file.is_absolute():
        return deid
    return deid.model_copy(update={"key_file": base / deid.key_file})


class NodeService:
    def __init__(self, loaded: LoadedConfig) -> None:
        cfg, paths = loaded.config, loaded.storage
        self._wake = threading.Event()  # hand-offs wake the next stage instead of waiting for its poll
        self.cfg = cfg
        self.audit = AuditLog(paths.audit_log, node_ae=cfg.node.ae_title)
        self.store = Store(paths.database_url)
        self.atna = None
        if cfg.atna is not None:  # audit records also go to the hospital's audit repository (IHE ATNA)
            self.atna = build_atna_forwarder(
                cfg.atna, node_ae=cfg.node.ae_title, base=config_dir(loaded.source),
                patient_lookup=lambda uid: getattr(self.store.get_study(uid), "patient_id", None))
            if self.atna is not None:
                self.audit.add_listener(self.atna)
        self.spool = Spool(paths.spool_dir)
        tls_base = config_dir(loaded.source)  # relative TLS file paths are relative to the config file
        deidentifier, returns = None, None
        if cfg.deid is not None:  # external destinations: de-identified copies out, re-identified results in
            pseudonyms = PseudonymMap(self.store.engine)
            settings = _with_base(cfg.deid, tls_base)
            deidentifier = Deidentifier(settings, load_key(settings), pseudonyms)
            returns = ReturnedResults(self.store, self.audit, self.spool, paths.results_dir, cfg.destinations,
                                      pseudonyms)
        self.scp = StoreSCP(cfg.node, self.spool, self.store, self.audit, min_free_mb=cfg.storage.min_free_mb,
                            ssl_context=server_context(cfg.node.tls, tls_base) if cfg.node.tls else None,
                            returns=returns,
                            turns=AcceptTurns.create(receivers) if (receivers := cfg.receive_process_count()) > 1
                            else None,
                            established_elsewhere=lambda: self.receivers.elsewhere() if self.receivers else 0)
        self.receivers: ReceiveProcesses | None = None  # more than 1 receive process: started with the SCP
        self._tls_base = tls_base
        self.forwarder = Forwarder(self.store, self.spool, paths.results_dir, cfg.destinations, deidentifier)
        self.assembler = Assembler(self.store, self.audit, cfg.assemble.quiet_period_s, sources=cfg.sources,
                                   node_ae=cfg.node.ae_title, evidence_check_s=cfg.assemble.evidence_check_s,
                                   evidence_min_interval_s=cfg.assemble.evidence_min_interval_s,
                                   on_complete=self._wake.set)
        self.scp.on_released = self._sender_done
        self.router = Router(self.store, self.audit, cfg.rules)
        self.results_dir = paths.results_dir
        rule_plugins = cfg.rule_plugins()
        needs = plugin_needs(rule_plugins, cfg.plugins)
        slots = plan_slots(cfg.run.workers, cfg.run.gpu, needs, cfg.run.device, ray=cfg.run.executor == "ray")
        for count in {s.per_gpu for s in slots if s.per_gpu is not None}:
            log.info("gpu slots per_gpu=%d why=%r", count.per_gpu, count.why)
        log_level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self.ray = None  # with run.executor: ray, the jobs run as actors on a Ray cluster
        if cfg.run.executor == "ray":
            from node.run.ray_executor import RayBackend

            self.ray = RayBackend(cfg.run.ray, self.spool, cfg.node.ae_title)
        self.workers = WorkerPool(self.store, self.audit, self.spool, paths.results_dir, cfg.plugins,
                                  slots=slots, timeout_s=cfg.run.timeout_s,
                                  memory_limit_mb=cfg.run.memory_limit_mb,
                                  gpu_memory_mb={n: v.gpu_memory_mb for n, v in needs.items()},
                                  preload=rule_plugins,
                                  log_level=log_level,
                                  models_dir=paths.models_dir, device=cfg.run.device,
                                  routine_max_wait_s=cfg.run.routine_max_wait_s,
                                  report_kinds={**{n: "ORU" for n in cfg.ris}, **{n: "FHIR" for n in cfg.fhir}},
                                  rule_priors={r.name: r.priors for r in cfg.rules if r.priors},
                                  sources=cfg.sources, node_ae=cfg.node.ae_title, forwarder=self.forwarder,
                                  accepts={n: frozenset(d.accepts) for n, d in cfg.destinations.items()},
                                  max_key_images=max((d.max_key_images for d in cfg.destinations.values()), default=1),
                                  shadow_of={r.name: r.shadow_of for r in cfg.rules if r.shadow_of},
                                  sr_process=cfg.run.use_sr_process(),
                                  read_ahead_mb=cfg.run.read_ahead_mb,
                                  gpu_decode=cfg.run.gpu_decode,
                                  prefault_mb=cfg.run.prefault_mb,
                                  could_take=functools.partial(could_take, cfg.rules),
                                  runners=self.ray and self.ray.runners(cfg.plugins, log_level, paths.models_dir,
                                                                        cfg.run.device, cfg.run.gpu_decode))
        self.models_dir = paths.models_dir
        self.dispatcher = Dispatcher(self.store, self.audit, with_resolved_tls(cfg.destinations, tls_base),
                                     cfg.node.ae_title,
                                     ris={n: resolve_paths(d, tls_base) for n, d in cfg.ris.items()},
                                     fhir={n: resolve_paths(d, tls_base) for n, d in cfg.fhir.items()},
                                     dicomweb={n: d.with_resolved_paths(tls_base) for n, d in cfg.dicomweb.items()})
        self.workers.on_results = self.dispatcher.wake
        self.scp.on_indexed = self.workers.arrived
        self.workers.receiving = self.scp.established_count
        self.requests = RequestHandler(self.store, self.audit)
        self.purger = Purger(self.store, self.audit, self.spool, paths.results_dir,
                             cfg.storage.retention_hours, cfg.storage.purge_interval_s)
        self.drift = DriftWatch(self.store, self.audit, cfg.monitoring)
        self.liveness = Liveness(self.store, self.audit, cfg.node.ae_title, cfg.run.takeover_after_s,
                                 cfg.run.max_attempts)
        self._stop = threading.Event()
        self._pipeline: threading.Thread | None = None
        self._maintenance: threading.Thread | None = None
        self.source = loaded.source
        self.api = build_api(cfg, self.store, self.audit, tls_base)  # None without an api: section

    def start(self) -> None:
        models = verify_models(self.cfg, self.models_dir, self.store)  # raises ModelError: refuse to start
        with self.store.startup_lock():  # one node at a time: a starting peer waits for these repairs
            self.liveness.register()
            peers = self.liveness.live_peers()
            t = time.perf_counter()
            if peers:  # their in-flight temp, result and priors files would look like a crash's leftovers
                fixed = None
                log.info("start-up file reconciliation skipped: live nodes share the store %s",
                         [f"{p.name}@{p.host}:{p.pid}" for p in peers])
            else:
                fixed = reconcile(self.store, self.spool, self.results_dir)
            reconcile_s = round(time.perf_counter() - t, 3)
            taken = self.liveness.take_over()  # jobs of dead instances only, never a live peer's
        requeued = [t.job for t in taken if t.outcome == "requeued"]
        workers = [{"name": s.name, "gpu": s.gpu.index if s.gpu else None,
                    "gpu_budget_mb": s.gpu.budget_mb if s.gpu else None} for s in self.workers.slots]
        self.audit.append("node-start", config=self.source, workers=workers, executor=self.cfg.run.executor,
                          reconciled=(fixed.as_dict() or None) if fixed is not None else None,
                          reconcile_skipped_for=[p.id for p in peers] or None, instance=self.store.instance_id,
                          reconcile_s=reconcile_s, jobs_requeued=[j.id for j in requeued] or None,
                          models=[{"model": m.name, "version": m.version, "weights_sha256": m.weights_sha256,
                                   "package_digest": m.digest, "not_for_clinical_use": m.manifest.not_for_clinical_use}
                                  for m in models] or None)
        self.router.route_pending()  # studies left complete by an earlier stop
        self.liveness.start()
        self.workers.start(clear_priors=not peers)
        self.dispatcher.start()
        self._pipeline = threading.Thread(target=self._pipeline_loop, name="assemble-route", daemon=True)
        self._pipeline.start()
        self._maintenance = threading.Thread(target=self._maintenance_loop, name="maintenance", daemon=True)
        self._maintenance.start()
        self.scp.start()
        if self.scp.turns is not None:  # more than 1 receive process
            self.receivers = ReceiveProcesses(
                self.cfg.node, self.scp.listening_socket(), self.scp.turns, self.spool,
                {"store": self.store, "audit": self.audit, "index": self.scp.index, "scp": self.scp},
                run_dir(),
                tls_base=self._tls_base, min_free_mb=self.cfg.storage.min_free_mb)
            self.receivers.start(lambda: len(self.scp._established()))
        self.assembler.open_since = time.time()
        if self.api is not None:
            self.api.start()

    def _sender_done(self, study_uids: set[str]) -> None:
        self.assembler.sender_done(study_uids)
        self._wake.set()

    def _maintenance_loop(self) -> None:
        while not self._stop.is_set():
            for task in (self.requests.tick, self.purger.tick, self.drift.tick):
                try:
                    task()
                except Exception:  # noqa: BLE001 - keep the node serving; the task runs again next tick
                    log.exception("maintenance task failed task=%s", task.__self__.__class__.__name__)
            self._stop.wait(0.5)

    def _pipeline_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # a completion during the tick makes the next one start at once
            try:
                for study_uid in self.assembler.tick():
                    self.router.route(study_uid)
                    self.workers.wake()
            except Exception:  # noqa: BLE001 - keep the node serving; the study stays in its state
                log.exception("assemble/route tick failed")
            self._wake.wait(self.cfg.assemble.poll_interval_s)

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop taking associations, let in-flight ones and running jobs finish, persist the rest."""
        log.info("shutting down")
        if self.api is not None:
            self.api.stop()
        self.scp.stop_accepting()
        if self.receivers is not None:
            self.receivers.stop_accepting()
        self.scp.wait_for_associations(timeout)
        if self.receivers is not None:
            self.receivers.wait_for_associations(timeout)
        self._stop.set()
        self._wake.set()
        for t in (self._pipeline, self._maintenance):
            if t:
                t.join(10)
        self.assembler.close()
        clean = self.workers.stop(self.cfg.run.shutdown_grace_s)
        if self.ray is not None:
            self.ray.close()
        self.dispatcher.stop()
        self.liveness.stop()
        self.scp.stop()
        if self.receivers is not None:
            self.receivers.stop()
        self.audit.append("node-stop", clean=clean)
        if self.atna is not None:
            self.atna.close(5)  # delivers what is queued, for at most 5 s; uses the store, so before it closes
        self.audit.close()
        self.store.close()
        return clean
