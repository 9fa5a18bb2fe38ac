"""Prometheus metrics of the node, fed by the audit log (a listener) and the store (queue depth at scrape time).

Listening to the audit records keeps the pipeline modules free of metrics code: every state change already
writes one record, so the counters count exactly what the audit trail holds (since this process started).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


log = logging.getLogger("ainode.metrics")

STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
RESULT_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
STUDIES_REMEMBERED = 10_000  # per table below: studies whose results never go out are forgotten, oldest first


class _QueueCollector(Collector):
    """Queue depth per priority and running jobs, read from the store when Prometheus scrapes."""

    def __init__(self, queue) -> None:  # type: ignore[no-untyped-def]
        self._queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            q = self._queue()
        except Exception as exc:  # noqa: BLE001 - a scrape must not fail because the store is busy
            log.warning("queue depth not available: %s", type(exc).__name__)
            return
        depth = GaugeMetricFamily("ainode_queue_depth", "Jobs waiting to run, per priority", labels=["priority"])
        for prio, n in sorted(q["queued"].items()):
            depth.add_metric([prio], n)
        yield depth
        yield GaugeMetricFamily("ainode_jobs_running", "Jobs running now", value=q["running"])


class NodeMetrics:
    def __init__(self, queue) -> None:  # type: ignore[no-untyped-def]
        """`queue`: a callable returning {"queued": {priority: n}, "running": n} (node/api/queries.py)."""
        r = self.registry = CollectorRegistry()
        self.instances = Counter("ainode_instances_received", "DICOM instances stored", ["calling_ae"], registry=r)
        self.bytes = Counter("ainode_received_bytes", "Bytes of DICOM instances stored", ["calling_ae"], registry=r)
        self.associations = Counter("ainode_associations", "Associations, by outcome",
                                    ["outcome"], registry=r)  # accepted | rejected
        self.completions = Counter("ainode_studies_completed", "Studies declared complete, by reason",
                                   ["reason"], registry=r)
        self.jobs = Counter("ainode_jobs_ended", "Jobs ended, by plugin and outcome", ["plugin", "outcome"],
                            registry=r)
        self.stage = Histogram("ainode_job_stage_seconds", "Job duration per plugin and stage (total: the whole job)",
                               ["plugin", "stage"], buckets=STAGE_BUCKETS, registry=r)
        self.gpu_peak = Gauge("ainode_gpu_memory_peak_mb", "GPU memory peak of the plugin's last job (MB)",
                              ["plugin"], registry=r)
        self.sent = Counter("ainode_dispatch_success", "Objects and reports delivered, per destination",
                            ["destination"], registry=r)
        self.failed = Counter("ainode_dispatch_failures", "Failed send attempts, per destination (final: gave up)",
                              ["destination", "final"], registry=r)
        self.drift = Gauge("ainode_model_drift_alert", "1 while a model's output on a scanner drifts from its "
                           "baseline (node/monitor/drift.py)", ["model", "scanner", "metric"], registry=r)
        self.result_latency = Histogram(
            "ainode_result_latency_seconds", "Seconds from a study's last received instance (since=last_image) or "
            "its completion (since=complete) to each result object or report delivered for it",
            ["since", "destination", "kind"], buckets=RESULT_BUCKETS, registry=r)
        # study UID -> when its last instance was stored / it was last declared complete (this process's records)
        self._since: dict[str, OrderedDict[str, float]] = {"last_image": OrderedDict(), "complete": OrderedDict()}
        self._since_lock = threading.Lock()  # listeners run on the appending threads, several at once
        r.register(_QueueCollector(queue))

    def set_drift_alerts(self, alerts: list[dict]) -> None:
        """Called at scrape time with node.monitor.drift.current_alerts: only current alerts are exported."""
        self.drift.clear()
        for a in alerts:
            self.drift.labels(a["model"], a["scanner"], a["metric"]).set(1)

    def on_record(self, rec: dict[str, Any]) -> None:
        """AuditLog listener: called after each record is written; must be quick and never raise far."""
        event = rec.get("event")
        if event == "instance-stored":
            ae = str(rec.get("calling_ae") or "")
            self.instances.labels(ae).inc()
            self.bytes.labels(ae).inc(float(rec.get("bytes") or 0))
            self._remember("last_image", rec)
        elif event == "association-accepted":
            self.associations.labels("accepted").inc()
        elif event == "association-rejected":
            self.associations.labels("rejected").inc()
        elif event == "study-complete" and rec.get("outcome") == "success":
            self.completions.labels(str(rec.get("reason") or "unknown")).inc()
            self._remember("complete", rec)
        elif event == "job-end":
            self._job_end(rec)
        elif event in ("object-sent", "report-sent"):
            self.sent.labels(str(rec.get("destination") or "")).inc()
            self._delivered(rec)
        elif event == "send-failed":
            self.failed.labels(str(rec.get("destination") or ""), "true" if rec.get("final") else "false").inc()

    def _remember(self, since: str, rec: dict[str, Any]) -> None:
        study = rec.get("study_uid")
        if not study:
            return
        at = _record_time(rec)
        with self._since_lock:
            table = self._since[since]
            table[study] = at
            table.move_to_end(study)
            if len(table) > STUDIES_REMEMBERED:
                table.popitem(last=False)

    def _delivered(self, rec: dict[str, Any]) -> None:
        """What the radiologist waits for: a result in the PACS (or the RIS), timed from the study's last image
        and from its completion. A result sent after a restart of this process, or of a study this process did
        not receive, has no start here and is not observed; nor one older than the study's latest image."""
        study = rec.get("study_uid")
        if not study:
            return
        at = _record_time(rec)
        labels = (str(rec.get("destination") or ""), str(rec.get("kind") or ""))
        with self._since_lock:
            starts = {since: table.get(study) for since, table in self._since.items()}
        for since, start in starts.items():
            if start is not None and at >= start:
                self.result_latency.labels(since, *labels).observe(at - start)

    def _job_end(self, rec: dict[str, Any]) -> None:
        plugin = str(rec.get("plugin") or "")
        self.jobs.labels(plugin, str(rec.get("outcome"))).inc()
        timings = rec.get("timings") or {}
        for key, value in timings.items():
            if key.endswith("_s") and isinstance(value, (int, float)):
                self.stage.labels(plugin, key.removesuffix("_s")).observe(float(value))
        peak = timings.get("gpu_memory_peak_mb")
        if isinstance(peak, (int, float)):
            self.gpu_peak.labels(plugin).set(float(peak))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _record_time(rec: dict[str, Any]) -> float:
    """The record's own time (its `ts`), so that the figures agree with the audit trail; now if it has none."""
    try:
        return datetime.fromisoformat(rec["ts"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return time.time()
