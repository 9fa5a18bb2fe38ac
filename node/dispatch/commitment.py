"""Storage Commitment Push Model as SCU (PS3.4 Annex J): after a C-STORE, ask the PACS (N-ACTION) to take
responsibility for the objects, and read its answer (N-EVENT-REPORT).

The answer comes on the N-ACTION's own association or, as Orthanc does, on a new association to the node's
SCP, whenever the PACS is ready. Either way `record_report` only writes it to the store; the dispatcher
applies it, because only it knows each destination's retry policy.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from node.config.schema import Destination
from node.dispatch.cstore import SendError, _tls_args
from node.store import Store

log = logging.getLogger("ainode.dispatch")

STORAGE_COMMITMENT = str(StorageCommitmentPushModel)  # 1.2.840.10008.1.20.1
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"  # the Storage Commitment Push Model SOP Instance
REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # N-EVENT-REPORT Event Type IDs
REPORT_WAIT_S = 1.0  # how long the N-ACTION's association stays open for a report on it

# Failure Reason (0008,1197), PS3.3 C.14.1.1
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class/instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}

# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8)
SUCCESS, PROCESSING_FAILURE, NO_SUCH_SOP_CLASS, INVALID_ARGUMENT = 0x0000, 0x0110, 0x0118, 0x0115


class CommitmentError(Exception):
    """The N-ACTION was not accepted: the PACS has not been asked, so ask again later."""


@dataclass(frozen=True)
class Report:
    transaction_uid: str
    event_type: int | None
    committed: list[str]  # SOP Instance UIDs
    failed: list[dict[str, str]]  # {"sop_instance_uid", "sop_class_uid", "reason"}


def new_transaction_uid() -> str:
    """A UUID-derived UID (2.25.…): unique without an org root, as PS3.5 B.2 allows."""
    return str(generate_uid(prefix=None))


def reason_text(code: Any) -> str:
    try:
        value = int(code)
    except (TypeError, ValueError):
        return "no failure reason given"
    return f"0x{value:04X} ({FAILURE_REASONS.get(value, 'unknown reason')})"


def request_dataset(transaction_uid: str, objects: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION's Action Information: the transaction and each (SOP Class UID, SOP Instance UID)."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in objects:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def parse_report(event_type: int | None, info: Dataset) -> Report:
    """The N-EVENT-REPORT's Event Information; ValueError when it names no transaction."""
    uid = str(info.get("TransactionUID", "") or "")
    if not uid:
        raise ValueError("no Transaction UID in the storage commitment report")
    committed = [str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])
                 if "ReferencedSOPInstanceUID" in i]
    failed = [{"sop_instance_uid": str(i.ReferencedSOPInstanceUID),
               "sop_class_uid": str(i.get("ReferencedSOPClassUID", "")),
               "reason": reason_text(i.get("FailureReason"))}
              for i in info.get("FailedSOPSequence", []) if "ReferencedSOPInstanceUID" in i]
    return Report(uid, event_type, committed, failed)


def record_report(store: Store, event: evt.Event, reporter: str) -> tuple[int, None]:
    """EVT_N_EVENT_REPORT handler body: store the report, then answer Success.

    A store failure answers Processing Failure (so a PACS that retries reports sends it again); a report for a
    transaction this node never requested is acknowledged and logged, since refusing it fixes nothing.
    """
    if str(event.request.AffectedSOPClassUID) != STORAGE_COMMITMENT:
        return NO_SUCH_SOP_CLASS, None
    try:
        report = parse_report(event.event_type, event.event_information)
    except Exception as exc:  # noqa: BLE001 - undecodable or incomplete: the peer's data
        log.warning("storage commitment report unreadable from=%s error=%s", reporter, exc)
        return INVALID_ARGUMENT, None
    try:
        before = store.commitment_reported(report.transaction_uid, report.committed, report.failed, reporter)
    except Exception as exc:  # noqa: BLE001 - must not answer Success without a durable record
        log.error("storage commitment report not recorded transaction=%s error=%s", report.transaction_uid,
                  type(exc).__name__)
        return PROCESSING_FAILURE, None
    if before is None:
        log.warning("storage commitment report for a transaction this node did not request transaction=%s from=%s",
                    report.transaction_uid, reporter)
    else:
        log.info("storage commitment report transaction=%s event_type=%s committed=%d failed=%d from=%s",
                 report.transaction_uid, report.event_type, len(report.committed), len(report.failed), reporter)
    return SUCCESS, None


def request_commitment(dest: Destination, calling_ae: str, transaction_uid: str,
                       objects: Sequence[tuple[str, str]], *,
                       on_report: Callable[[evt.Event], tuple[int, None]],
                       answered: Callable[[], bool] = lambda: False,
                       report_wait_s: float = REPORT_WAIT_S) -> None:
    """Send the N-ACTION (Request Storage Commitment) for `objects` on a new association.

    The association then stays open up to `report_wait_s` for a report on it (`on_report` records it) and
    closes early once `answered()` says the report came on the SCP instead. Raises CommitmentError naming
    the PACS and what to check when the request was not accepted.
    """
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    our_ae = dest.calling_ae_title or calling_ae
    ae = AE(ae_title=our_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    ae.add_requested_context(STORAGE_COMMITMENT)
    reported = threading.Event()

    def handler(event: evt.Event) -> tuple[int, None]:
        result = on_report(event)
        reported.set()
        return result

    try:
        tls_args = _tls_args(dest)
    except SendError as exc:
        raise CommitmentError(str(exc)) from None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_N_EVENT_REPORT, handler)])
    try:
        if not assoc.is_established:
            if assoc.is_rejected:
                raise CommitmentError(f"association for storage commitment rejected by {where}")
            raise CommitmentError(f"cannot connect to {where} for storage commitment" + (" (TLS)" if tls_args else ""))
        if not assoc.accepted_contexts:
            raise CommitmentError(f"{where} does not support Storage Commitment Push Model: "
                                  "set storage_commitment: false for this destination")
        try:
            status, _ = assoc.send_n_action(request_dataset(transaction_uid, objects), REQUEST_COMMITMENT,
                                            STORAGE_COMMITMENT, WELL_KNOWN_INSTANCE)
        except (RuntimeError, ValueError) as exc:
            raise CommitmentError(f"storage commitment request to {where} not sent: {exc}") from None
        code = getattr(status, "Status", None)
        if code is None:
            raise CommitmentError(f"{where} did not answer the storage commitment request (N-ACTION): it may not "
                                  f"know AE title '{our_ae}'; add the node as a modality there")
        if code != SUCCESS:
            raise CommitmentError(f"{where} refused the storage commitment request (N-ACTION): status 0x{code:04X}")
        deadline = time.monotonic() + report_wait_s
        while time.monotonic() < deadline and assoc.is_established:
            if reported.wait(0.05) or answered():
                break
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
