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
from node.dispatch.commitment import CommitmentError, new_transaction_uid, record_report, request_commitment
from node.dispatch.cstore import Outgoing, SendError, send_files
from node.config.base import RetryPolicy
from node.config.dicomweb import DicomWebDestination
from node.dispatch.stow import StowError, send_stow
from node.ris import FhirDestination, RisDestination, RisSendError, send_fhir, send_oru
from node.store import Store
from node.store.models import CommitmentState

log = logging.getLogger("ainode.dispatch")


def backoff_s(dest: RetryPolicy, attempts_made: int) -> float:
    return min(dest.backoff_initial_s * (2 ** max(0, attempts_made - 1)), dest.backoff_max_s)


class Dispatcher:
    def __init__(self, store: Store, audit: AuditLog, destinations: Mapping[str, Destination],
                 calling_ae: str, poll_interval_s: float = 0.5, *, lease_s: float = 600.0,
                 ris: Mapping[str, RisDestination] | None = None,
                 fhir: Mapping[str, FhirDestination] | None = None,
                 dicomweb: Mapping[str, DicomWebDestination] | None = None) -> None:
        self.store = store
        self.audit = audit
        self.destinations = destinations
        self.ris = dict(ris or {})
        self.fhir = dict(fhir or {})
        self.dicomweb = dict(dicomweb or {})
        self.calling_ae = calling_ae
        self.poll_interval_s = poll_interval_s
        self.lease_s = lease_s  # how long a claimed row is this dispatcher's (node/store/db.py claim_dispatches)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dispatcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """New results are due: send them now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # a wake during the tick makes the next one start at once
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must survive a bad row
                log.exception("dispatch tick failed")
            self._wake.wait(self.poll_interval_s)

    def tick(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        self._commitment_tick(now)
        due = self.store.claim_dispatches(now, self.lease_s)
        by_dest = defaultdict(list)
        for d in due:
            by_dest[d.destination].append(d)
        for name, rows in by_dest.items():
            try:
                self._send_batch(name, rows, now)
            except Exception:
                self.store.release_dispatches([d.id for d in rows])  # due again at the next tick
                raise
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

    def _send_batch(self, name: str, rows: list, now: float | None = None) -> None:  # type: ignore[type-arg]
        report_dest = self.ris.get(name) or self.fhir.get(name)
        if report_dest is not None:
            self._send_reports(name, report_dest, rows)
            return
        web = self.dicomweb.get(name)
        if web is not None:
            self._send_stow(name, web, rows)
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
        sent, sent_rows = [], []
        for d in rows:
            error = results.get(d.sop_instance_uid, "not attempted")
            if error is None:
                sent.append(d.id)
                sent_rows.append(d)
                self.audit.append("object-sent", study_uid=d.study_uid, job_id=d.job_id, destination=name,
                                  dest_ae=dest.ae_title, dest_host=dest.host, dest_port=dest.port,
                                  kind=d.kind, sop_instance_uid=d.sop_instance_uid, attempt=d.attempts + 1)
                log.info("sent kind=%s dest=%s job_id=%d", d.kind, name, d.job_id)
            else:
                self._failed(d, dest, error)
        if sent and dest.storage_commitment:
            # Not "sent" until the PACS reports the objects committed; the transaction is recorded first,
            # so a report that races the N-ACTION's response still finds it.
            now = time.time() if now is None else now
            txn = new_transaction_uid()
            self.store.dispatch_sent_uncommitted(sent, txn, name, now + dest.commitment_timeout_s, now)
            self._request_commitment(name, dest, txn, sent_rows, attempt=1, now=now)
        elif sent:
            self.store.dispatch_sent(sent)

    def _send_stow(self, name: str, dest: DicomWebDestination, rows: list) -> None:  # type: ignore[type-arg]
        """STOW-RS to a DICOMweb destination; a failure a retry cannot fix (4xx, refused instance) gives up."""
        files = [Outgoing(d.sop_instance_uid, d.sop_class_uid, Path(d.path)) for d in rows]
        try:
            results = send_stow(dest, files)
        except StowError as exc:
            for d in rows:
                self._failed(d, dest, str(exc), give_up=not exc.retryable)
            return
        sent = []
        for d in rows:
            error = results.get(d.sop_instance_uid, "not attempted")
            if error is None:
                sent.append(d.id)
                self.audit.append("object-sent", study_uid=d.study_uid, job_id=d.job_id, destination=name,
                                  dest_url=dest.url, kind=d.kind, sop_instance_uid=d.sop_instance_uid,
                                  attempt=d.attempts + 1)
                log.info("sent kind=%s dest=%s job_id=%d via=stow-rs", d.kind, name, d.job_id)
            else:
                self._failed(d, dest, str(error), give_up=not getattr(error, "retryable", True))
        if sent:
            self.store.dispatch_sent(sent)

    # ---- storage commitment --------------------------------------------

    def _commitment_tick(self, now: float) -> None:
        """Apply the reports the SCP recorded; ask again where none came in time, or give up."""
        self._apply_reports(now)
        for c in self.store.overdue_commitments(now):
            dest = self.destinations.get(c.destination)
            if dest is None:
                self._give_up(c, f"destination '{c.destination}' is no longer in the config")
                continue
            where = f"{dest.ae_title}@{dest.host}:{dest.port}"
            if c.attempt >= dest.max_attempts:
                why = (f"the storage commitment request failed: {c.error}" if c.error else
                       f"no storage commitment report from {where} within {dest.commitment_timeout_s:g}s")
                self._give_up(c, f"{why} ({c.attempt} requests, last transaction {c.transaction_uid}); check that "
                              f"{where} knows this node (AE '{dest.calling_ae_title or self.calling_ae}') as a "
                              "modality and can connect to its DICOM port, and that node.allowed_calling_aes "
                              "(if set) lists the PACS")
                continue
            txn = new_transaction_uid()
            rows = self.store.commitment_renew(c.transaction_uid, txn, now + dest.commitment_timeout_s, now)
            if rows:
                log.warning("storage commitment not reported, asking again dest=%s transaction=%s attempt=%d",
                            c.destination, txn, c.attempt + 1)
                self._request_commitment(c.destination, dest, txn, rows, attempt=c.attempt + 1, now=now,
                                         previous=c.transaction_uid)

    def _request_commitment(self, name: str, dest: Destination, txn: str, rows: list, *,  # type: ignore[type-arg]
                            attempt: int, now: float, previous: str | None = None) -> None:
        objects = self._objects(rows)
        self.audit.append("commitment-requested", destination=name, dest_ae=dest.ae_title, dest_host=dest.host,
                          dest_port=dest.port, transaction_uid=txn, attempt=attempt, replaces=previous, **objects)
        where = f"{dest.ae_title}@{dest.host}:{dest.port}"
        try:
            request_commitment(dest, self.calling_ae, txn, [(d.sop_class_uid, d.sop_instance_uid) for d in rows],
                               on_report=lambda e: record_report(self.store, e, f"{where} (same association)"),
                               answered=lambda: self.store.commitment_state(txn) != CommitmentState.WAITING)
        except CommitmentError as exc:
            delay = backoff_s(dest, attempt)
            self.store.commitment_request_failed(txn, str(exc), now + delay)
            self.audit.append("commitment-failed", "failure", destination=name, transaction_uid=txn,
                              attempt=attempt, error=str(exc), final=False, retry_in_s=round(delay, 1), **objects)
            log.warning("storage commitment request failed dest=%s transaction=%s attempt=%d error=%s",
                        name, txn, attempt, exc)
            return
        log.info("storage commitment requested dest=%s transaction=%s objects=%d", name, txn, len(rows))
        self._apply_reports(now)  # a report on the N-ACTION's own association is applied at once

    def _apply_reports(self, now: float) -> None:
        for c in self.store.reported_commitments():
            dest = self.destinations.get(c.destination)
            where = f"{dest.ae_title}@{dest.host}:{dest.port}" if dest else c.destination
            out = self.store.commitment_apply(
                c.transaction_uid, error_prefix=f"{where} reported the object not committed",
                max_attempts=dest.max_attempts if dest else 1,
                retry_at=lambda attempts, dest=dest: now + (backoff_s(dest, attempts) if dest else 0.0))
            if out is None:
                continue
            base = dict(destination=c.destination, transaction_uid=c.transaction_uid, attempt=c.attempt,
                        reported_by=c.reported_by)
            if out.committed:
                self.audit.append("commitment-confirmed", **base, **self._objects(out.committed))
                log.info("storage commitment confirmed dest=%s transaction=%s objects=%d", c.destination,
                         c.transaction_uid, len(out.committed))
            if out.failed:
                self.audit.append("commitment-failed", "failure", **base, failed=out.failed, late=out.late or None,
                                  resent=[d.sop_instance_uid for d in out.resent] or None,
                                  dead_letter=[d.sop_instance_uid for d in out.dead] or None)
                log.warning("storage commitment failures dest=%s transaction=%s failed=%d resend=%d dead_letter=%d",
                            c.destination, c.transaction_uid, len(out.failed), len(out.resent), len(out.dead))

    def _give_up(self, c, error: str) -> None:  # type: ignore[no-untyped-def]
        rows = self.store.commitment_give_up(c.transaction_uid, error)
        self.audit.append("commitment-failed", "failure", destination=c.destination,
                          transaction_uid=c.transaction_uid, attempt=c.attempt, error=error, final=True,
                          **self._objects(rows))
        log.error("storage commitment gave up dest=%s transaction=%s objects=%d error=%s", c.destination,
                  c.transaction_uid, len(rows), error)

    @staticmethod
    def _objects(rows: list) -> dict:  # type: ignore[type-arg]
        """Audit fields naming a transaction's objects, their jobs and studies."""
        studies = sorted({d.study_uid for d in rows})
        return dict(sop_instance_uids=[d.sop_instance_uid for d in rows], job_ids=sorted({d.job_id for d in rows}),
                    study_uid=studies[0] if len(studies) == 1 else None,
                    study_uids=studies if len(studies) > 1 else None)

    def _failed(self, d, dest: RetryPolicy | None, error: str,  # type: ignore[no-untyped-def]
                give_up: bool = False) -> None:
        attempts = d.attempts + 1
        give_up = give_up or dest is None or attempts >= dest.max_attempts
        delay = 0.0 if dest is None else backoff_s(dest, attempts)
        self.store.dispatch_retry(d.id, error, time.time() + delay, give_up)
        self.audit.append("send-failed", "failure", study_uid=d.study_uid, job_id=d.job_id,
                          destination=d.destination, kind=d.kind, sop_instance_uid=d.sop_instance_uid,
                          attempt=attempts, error=error, final=give_up,
                          retry_in_s=None if give_up else round(delay, 1))
        if give_up:  # nothing more happens on its own: say so at ERROR, with what to do
            log.error("send failed, gave up (dead-letter) dest=%s job_id=%d kind=%s sop_instance_uid=%s attempt=%d "
                      "error=%s; once the destination works: ainode requeue --job %d",
                      d.destination, d.job_id, d.kind, d.sop_instance_uid, attempts, error, d.job_id)
        else:
            log.warning("send failed dest=%s job_id=%d kind=%s sop_instance_uid=%s attempt=%d retry_in_s=%.1f "
                        "error=%s", d.destination, d.job_id, d.kind, d.sop_instance_uid, attempts, delay, error)
