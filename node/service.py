"""Wires receive → assemble → route → run → dispatch into one running node."""

from __future__ import annotations

import logging
import threading

from node.assemble import Assembler
from node.audit import AuditLog
from node.config import LoadedConfig
from node.dispatch import Dispatcher
from node.receive import Spool, StoreSCP
from node.route import Router
from node.run.worker import WorkerPool
from node.store import Store

log = logging.getLogger("ainode.service")


class NodeService:
    def __init__(self, loaded: LoadedConfig) -> None:
        cfg, paths = loaded.config, loaded.storage
        self.cfg = cfg
        self.audit = AuditLog(paths.audit_log, node_ae=cfg.node.ae_title)
        self.store = Store(paths.database_url)
        self.spool = Spool(paths.spool_dir)
        self.scp = StoreSCP(cfg.node, self.spool, self.store, self.audit, min_free_mb=cfg.storage.min_free_mb)
        self.assembler = Assembler(self.store, self.audit, cfg.assemble.quiet_period_s)
        self.router = Router(self.store, self.audit, cfg.rules)
        self.workers = WorkerPool(self.store, self.audit, self.spool, paths.results_dir, cfg.plugins,
                                  workers=cfg.run.workers)
        self.dispatcher = Dispatcher(self.store, self.audit, cfg.destinations, cfg.node.ae_title)
        self._stop = threading.Event()
        self._pipeline: threading.Thread | None = None
        self.source = loaded.source

    def start(self) -> None:
        removed = self.spool.remove_partials()
        requeued, failed = self.store.requeue_interrupted(self.cfg.run.max_attempts)
        self.audit.append("node-start", config=self.source, partial_files_removed=removed,
                          jobs_requeued=[j.id for j in requeued] or None)
        for job in failed:
            self.audit.append("job-end", "failure", study_uid=job.study_uid, job_id=job.id, plugin=job.plugin,
                              error=job.error)
            log.error("job failed job_id=%d error=%s", job.id, job.error)
        if removed:
            log.warning("removed partial spool files count=%d", removed)
        self.router.route_pending()  # studies left complete by an earlier stop
        self.workers.start()
        self.dispatcher.start()
        self._pipeline = threading.Thread(target=self._pipeline_loop, name="assemble-route", daemon=True)
        self._pipeline.start()
        self.scp.start()

    def _pipeline_loop(self) -> None:
        while not self._stop.is_set():
            try:
                for study_uid in self.assembler.tick():
                    self.router.route(study_uid)
            except Exception:  # noqa: BLE001 - keep the node serving; the study stays in its state
                log.exception("assemble/route tick failed")
            self._stop.wait(self.cfg.assemble.poll_interval_s)

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop taking associations, let in-flight ones and running jobs finish, persist the rest."""
        log.info("shutting down")
        self.scp.stop_accepting()
        self.scp.wait_for_associations(timeout / 2)
        self._stop.set()
        if self._pipeline:
            self._pipeline.join(10)
        clean = self.workers.stop(timeout / 2)
        self.dispatcher.stop()
        self.scp.stop()
        self.audit.append("node-stop", clean=clean)
        self.audit.close()
        self.store.close()
        return clean
