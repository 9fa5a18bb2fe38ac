"""Sends built results to their destinations (PACS by C-STORE, RIS by HL7 or FHIR), with retries and
exponential backoff; an error a retry cannot fix (a RIS answering AE, HTTP 4xx) gives up at once."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Mapping

from node.audit import AuditLog
from node.config.schema import Destination
from node.dispatch.cstore import Outgoing, SendError, send_files
from node.ris import FhirDestination, RisDestination, RisSendError, send_fhir, send_oru
from node.store import Store

log = logging.getLogger("ainode.dispatch")


def backoff_s(dest: Destination | RisDestination | FhirDestination, attempts_made: int) -> float:
    return min(dest.backoff_initial_s * (2 ** max(0, attempts_made - 1)), dest.backoff_max_s)


class Dispatcher:
    def __init__(self, store: Store, audit: AuditLog, destinations: Mapping[str, Destination],
                 calling_ae: str, poll_interval_s: float = 0.5, *,
                 ris: Mapping[str, RisDestination] | None = None,
                 fhir: Mapping[str, FhirDestination] | None = None) -> None:
        self.store = store
        self.audit = audit
        self.destinations = destinations
        self.ris = dict(ris or {})
        self.fhir = dict(fhir or {})
        self.calling_ae = calling_ae
        self.poll_interval_s = poll_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must survive a bad row
                log.exception("dispatch tick failed")
            self._stop.wait(self.poll_interval_s)

    def tick(self, now: float | None = None) -> int:
        due = self.store.due_dispatches(time.time() if now is None else now)
        by_dest = defaultdict(list)
        for d in due:
            by_dest[d.destination].append(d)
        for name, rows in by_dest.items():
            self._send_batch(name, rows)
        return len(due)

    def _send_reports(self, name: str, dest: RisDestination | FhirDestination, rows: list) -> None:  # type: ignore[type-arg]
        """One HL7 ORU^R01 or FHIR Bundle per row (a job's SR), each acknowledged before the next."""
        for d in rows:
            try:
                if isinstance(dest, RisDestination):
                    # The same control id on every attempt, so a RIS can spot a resend after a lost ACK.
                    ack = send_oru(dest, Path(d.path), control_id=f"AIN{d.id}")
                else:
                    ack = send_fhir(dest, Path(d.path))
            except RisSendError as exc:
                self._failed(d, dest, str(exc), give_up=not exc.retryable)
                continue
            except OSError as exc:
                self._failed(d, dest, f"cannot read {d.path}: {exc}")
                continue
            self.store.dispatch_sent([d.id])
            where = (dict(dest_host=dest.host, dest_port=dest.port) if isinstance(dest, RisDestination)
                     else dict(dest_url=dest.base_url))
            self.audit.append("report-sent", study_uid=d.study_uid, job_id=d.job_id, destination=name, kind=d.kind,
                              sop_instance_uid=d.sop_instance_uid, attempt=d.attempts + 1, ack=ack, **where)
            log.info("report sent kind=%s dest=%s job_id=%d", d.kind, name, d.job_id)

    def _send_batch(self, name: str, rows: list) -> None:  # type: ignore[type-arg]
        report_dest = self.ris.get(name) or self.fhir.get(name)
        if report_dest is not None:
            self._send_reports(name, report_dest, rows)
            return
        dest = self.destinations.get(name)
        if dest is None:
            for d in rows:
                self._failed(d, None, f"destination '{name}' is no longer in the config", give_up=True)
            return
        files = [Outgoing(d.sop_instance_uid, d.sop_class_uid, Path(d.path)) for d in rows]
        try:
            results = send_files(dest, self.calling_ae, files)
        except (SendError, OSError) as exc:
            for d in rows:
                self._failed(d, dest, str(exc))
            return
        sent = []
        for d in rows:
            error = results.get(d.sop_instance_uid, "not attempted")
            if error is None:
                sent.append(d.id)
                self.audit.append("object-sent", study_uid=d.study_uid, job_id=d.job_id, destination=name,
                                  dest_ae=dest.ae_title, dest_host=dest.host, dest_port=dest.port,
                                  kind=d.kind, sop_instance_uid=d.sop_instance_uid, attempt=d.attempts + 1)
                log.info("sent kind=%s dest=%s job_id=%d", d.kind, name, d.job_id)
            else:
                self._failed(d, dest, error)
        if sent:
            self.store.dispatch_sent(sent)

    def _failed(self, d, dest: Destination | RisDestination | FhirDestination | None, error: str,  # type: ignore[no-untyped-def]
                give_up: bool = False) -> None:
        attempts = d.attempts + 1
        give_up = give_up or dest is None or attempts >= dest.max_attempts
        delay = 0.0 if dest is None else backoff_s(dest, attempts)
        self.store.dispatch_retry(d.id, error, time.time() + delay, give_up)
        self.audit.append("send-failed", "failure", study_uid=d.study_uid, job_id=d.job_id,
                          destination=d.destination, kind=d.kind, sop_instance_uid=d.sop_instance_uid,
                          attempt=attempts, error=error, final=give_up,
                          retry_in_s=None if give_up else round(delay, 1))
        log.warning("send failed dest=%s job_id=%d attempt=%d final=%s error=%s",
                    d.destination, d.job_id, attempts, give_up, error)
