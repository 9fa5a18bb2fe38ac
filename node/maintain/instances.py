"""This node process among the others sharing its store: registration, heartbeat, takeover of dead peers.

With SQLite there is one node, and this reduces to what it always did: at start-up, jobs found
running were cut off by the previous run and are queued again. With PostgreSQL several node processes
share the store; each heartbeats here, and each takes over the running jobs of an instance that is
dead: its heartbeat older than run.takeover_after_s, or (same host) its process gone.
The heartbeat runs in a thread of its own, so a slow maintenance task cannot make a live node look dead.
"""

from __future__ import annotations

import logging
import threading

from node.audit import AuditLog
from node.store import Store
from node.store.db import TakeOver
from node.store.models import NodeInstance

log = logging.getLogger("ainode.instances")


class Liveness:
    def __init__(self, store: Store, audit: AuditLog, name: str, takeover_after_s: float, max_attempts: int) -> None:
        self.store = store
        self.audit = audit
        self.name = name
        self.takeover_after_s = takeover_after_s
        self.max_attempts = max_attempts
        self.interval_s = min(5.0, max(0.2, takeover_after_s / 4))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def register(self) -> None:
        self.store.register_instance(self.name)
        log.info("node instance registered instance=%s host=%s", self.store.instance_id, self.store.host)

    def live_peers(self) -> list[NodeInstance]:
        return self.store.live_peers(self.takeover_after_s)

    def take_over(self) -> list[TakeOver]:
        """Queue again (or fail, out of run.max_attempts) the running jobs of dead instances; audit each."""
        taken = self.store.take_over(self.takeover_after_s, self.max_attempts)
        for t in taken:
            j = t.job
            self.audit.append("job-takeover", study_uid=j.study_uid, job_id=j.id, plugin=j.plugin,
                              from_instance=t.from_instance, from_host=t.from_host, from_pid=t.from_pid,
                              by_instance=self.store.instance_id, attempts=j.attempts, result=t.outcome)
            log.warning("job taken over job_id=%d from_instance=%s result=%s", j.id, t.from_instance, t.outcome)
            if t.outcome == "failed":
                self.audit.append("job-end", "failure", study_uid=j.study_uid, job_id=j.id, plugin=j.plugin,
                                  error=j.error)
                log.error("job failed job_id=%d error=%s", j.id, j.error)
        return taken

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                declared_by = self.store.heartbeat()
                if declared_by:
                    log.error("this node was declared dead by instance %s (no heartbeat for run.takeover_after_s"
                              " = %gs); its running jobs were taken over", declared_by, self.takeover_after_s)
                    self.audit.append("node-declared-dead", "failure", instance=self.store.instance_id,
                                      by_instance=declared_by)
                self.take_over()
            except Exception:  # noqa: BLE001 - a store hiccup must not end the heartbeat
                log.exception("heartbeat failed")

    def stop(self) -> None:
        """A clean stop: after the workers released their jobs, the instance is marked stopped."""
        self._stop.set()
        if self._thread:
            self._thread.join(10)
        self.store.instance_stopped()
