"""HL7 v2.5 ORU^R01 from a result SR, built with hl7apy, and sent to a RIS over MLLP.

Layout (one message per SR, i.e. per finished study and plugin):
  MSH  ORU^R01^ORU_R01, the caller's control id, UTF-8
  PID  PID-3 PatientID (issuer when the SR has one), PID-5 name, PID-7 birth date, PID-8 sex
  ORC  RE, placer and filler order number = AccessionNumber
  OBR  same order numbers, OBR-4 the SR's procedure code, OBR-7 study date/time, OBR-25 P or F
  OBX  per finding (OBX-4 = the finding's number, 1..n): the finding code (CE), its tracking id (ST),
       the finding site (CE), each measurement (NM, code from the SR, UCUM unit in OBX-6), the confidence
       (NM, DCM 111012 in %, also as OBX-9 probability on the finding's OBX)
  OBX  with no sub-id: Study / Series / SOP Instance UID of the SR (HD, ISO), so the RIS can link to the
       PACS object; the algorithm, model version and "not for clinical use" where the SR says so (TX)
Every value from the SR or config is set as an hl7apy leaf of its HL7 type (OBX-5: as components that
hl7apy escaped), so | ^ & ~ \\ in free text are escaped. MSH-15/16 stay empty: original acknowledgement
mode, in which a RIS answers AA/AE/AR (an enhanced-mode CA/CE/CR is understood too).
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

from hl7apy.core import Element, Message, Segment
from hl7apy.factories import datatype_factory
from pydicom.valuerep import PersonName

from node.plugin_api import Code

from .config import RisDestination
from .errors import RisSendError
from .mllp import send_message
from .report import Num, Report, patient_data_redacted, read_report
from .tls import mllp_context

log = logging.getLogger(__name__)

HL7_VERSION = "2.5"
# Codes for the document-level OBX segments. DCM has no code for "SOP Instance UID"; 99AIN is a local
# coding system (HL7 reserves 99* for local ones).
STUDY_UID = Code("110180", "DCM", "Study Instance UID")
SERIES_UID = Code("112002", "DCM", "Series Instance UID")
SOP_UID = Code("SOPInstanceUID", "99AIN", "SOP Instance UID")
ALGORITHM = Code("111001", "DCM", "Algorithm Name")
FINDING = Code("121071", "DCM", "Finding")
FINDING_SITE = Code("363698007", "SCT", "Finding Site")
TRACKING_ID = Code("112039", "DCM", "Tracking Identifier")
CONTROL_ID = re.compile(r"^[^|^~\\&\r\n]{1,20}$")  # MSH-10 is ST, at most 20 characters in v2.5


def _put(parent: Element, name: str, text: str) -> None:
    """Set the leaf `name` of `parent` as a value of its own HL7 type, which hl7apy escapes when encoding."""
    child = getattr(parent, name)
    child.value = datatype_factory(child.datatype, text, version=HL7_VERSION)


def _components(*parts: str) -> str:
    """ER7 of an OBX-5 (whose type hl7apy only knows as "varies"): each component escaped by hl7apy."""
    return "^".join(datatype_factory("ST", p, version=HL7_VERSION).to_er7() for p in parts).rstrip("^")


def _decimal(value: Decimal) -> str:
    """An HL7 NM: plain digits, never an exponent (a DICOM DS may be written "1e3")."""
    return format(value, "f")


def _ce(field: Element, code: Code) -> None:
    """Fill a CE field or component: identifier ^ text ^ coding system (DICOM scheme = HL7 table 0396 name)."""
    _put(field, "ce_1", code.value)
    if code.meaning:
        _put(field, "ce_2", code.meaning)
    if code.scheme:
        _put(field, "ce_3", code.scheme)


class _Obx:
    """Appends OBX segments with running set ids to one order observation group."""

    def __init__(self, order: object, status: str, when: str) -> None:
        self.order, self.status, self.when, self.n = order, status, when, 0

    def add(self, value_type: str, concept: Code, sub_id: str | None = None) -> Segment:
        self.n += 1
        obx = self.order.add_group("ORU_R01_OBSERVATION").add_segment("OBX")  # type: ignore[attr-defined]
        obx.obx_1 = str(self.n)
        obx.obx_2 = value_type
        _ce(obx.obx_3, concept)
        if sub_id:
            _put(obx, "obx_4", sub_id)
        obx.obx_11 = self.status
        if self.when:
            obx.obx_14 = self.when
        return obx

    def numeric(self, num: Num, sub_id: str) -> Segment:
        obx = self.add("NM", num.concept, sub_id)
        obx.obx_5 = _decimal(num.value)
        _ce(obx.obx_6, num.unit)
        return obx

    def coded(self, concept: Code, value: Code, sub_id: str | None = None) -> Segment:
        obx = self.add("CE", concept, sub_id)
        obx.obx_5 = _components(value.value, value.meaning, value.scheme)
        return obx

    def text(self, value_type: str, concept: Code, text: str, sub_id: str | None = None) -> Segment:
        obx = self.add(value_type, concept, sub_id)
        obx.obx_5 = _components(text)
        return obx

    def uid(self, concept: Code, uid: str) -> Segment:
        obx = self.add("HD", concept)
        obx.obx_5 = _components("", uid, "ISO")
        return obx


def _msh(msg: Message, dest: RisDestination, control_id: str, now: datetime) -> None:
    msh = msg.msh
    for attr, value in (("msh_3", dest.sending_application), ("msh_4", dest.sending_facility),
                        ("msh_5", dest.receiving_application), ("msh_6", dest.receiving_facility)):
        if value:
            _put(getattr(msh, attr), "hd_1", value)
    msh.msh_7 = now.strftime("%Y%m%d%H%M%S%z")
    msh.msh_9 = "ORU^R01^ORU_R01"
    _put(msh, "msh_10", control_id)
    msh.msh_11 = "P"
    msh.msh_12 = HL7_VERSION
    msh.msh_18 = "UNICODE UTF-8"


def _pid(patient: object, report: Report) -> None:
    pid = patient.add_segment("PID")  # type: ignore[attr-defined]
    pid.pid_1 = "1"
    _put(pid.pid_3, "cx_1", report.patient_id)
    if report.issuer_of_patient_id:
        _put(pid.pid_3.cx_4, "hd_1", report.issuer_of_patient_id)
    pid.pid_3.cx_5 = "PI"
    name = PersonName(report.patient_name)
    for part, value in (("xpn_1", name.family_name), ("xpn_2", name.given_name), ("xpn_3", name.middle_name),
                        ("xpn_4", name.name_suffix), ("xpn_5", name.name_prefix)):
        if value:
            _put(pid.pid_5.xpn_1, "fn_1", value) if part == "xpn_1" else _put(pid.pid_5, part, value)
    if report.birth_date:
        pid.pid_7 = report.birth_date
    pid.pid_8 = report.sex if report.sex in {"M", "F", "O"} else "U"


def _order(order: object, report: Report, status: str) -> None:
    orc = order.add_segment("ORC")  # type: ignore[attr-defined]
    orc.orc_1 = "RE"
    _put(orc.orc_2, "ei_1", report.accession)
    _put(orc.orc_3, "ei_1", report.accession)
    orc.orc_5 = "CM"
    obr = order.add_segment("OBR")  # type: ignore[attr-defined]
    obr.obr_1 = "1"
    _put(obr.obr_2, "ei_1", report.accession)
    _put(obr.obr_3, "ei_1", report.accession)
    _ce(obr.obr_4, report.procedure or Code("", "", "AI imaging measurements"))
    if report.study_datetime:
        obr.obr_7 = report.study_datetime
    if report.content_datetime:
        obr.obr_22 = report.content_datetime
    obr.obr_25 = status


def _algorithm_text(report: Report) -> str:
    algos = "; ".join(a.describe() for a in report.algorithms) or "unnamed algorithm"
    text = f"AI result by {algos}."
    if report.preliminary:
        text += " Unverified by a physician."
    if report.not_for_clinical_use:
        text += " NOT FOR CLINICAL USE."
    return text


def build_oru(report: Report, dest: RisDestination, control_id: str, *, now: datetime | None = None) -> Message:
    """The ORU^R01 for `report` (see the module docstring for what goes where)."""
    if not CONTROL_ID.match(control_id):
        raise RisSendError(f"control id {control_id!r} is not a valid MSH-10 (1-20 characters, no HL7 "
                           f"delimiters)", retryable=False)
    now = now or datetime.now(timezone.utc)
    status = "P" if report.preliminary else "F"
    msg = Message("ORU_R01", version=HL7_VERSION)
    _msh(msg, dest, control_id, now)
    result = msg.add_group("ORU_R01_PATIENT_RESULT")
    _pid(result.add_group("ORU_R01_PATIENT"), report)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    _order(order, report, status)
    obx = _Obx(order, status, report.content_datetime)
    for i, g in enumerate(report.groups, start=1):
        sub = str(i)
        if g.finding:
            seg = obx.coded(FINDING, g.finding, sub)
            if g.confidence is not None:
                seg.obx_9 = _decimal(g.confidence.value / Decimal(100))
        if g.tracking_id:
            obx.text("ST", TRACKING_ID, g.tracking_id, sub)
        if g.finding_site:
            obx.coded(FINDING_SITE, g.finding_site, sub)
        for m in g.measurements:
            obx.numeric(m, sub)
        if g.confidence is not None:
            obx.numeric(g.confidence, sub)
    obx.uid(STUDY_UID, report.study_uid)
    obx.uid(SERIES_UID, report.series_uid)
    obx.uid(SOP_UID, report.sop_uid)
    obx.text("TX", ALGORITHM, _algorithm_text(report))
    return msg


def send_oru(dest: RisDestination, sr_path: Path, *, control_id: str) -> str:
    """Send the SR at `sr_path` to `dest` as one ORU^R01 and wait for its ACK; one attempt, no retry here.

    Use the same `control_id` for every attempt at the same message, so a RIS that got an earlier attempt
    (and whose ACK was lost) can recognise the duplicate. Returns a one-line summary of the ACK.
    Raises RisSendError; `retryable` tells whether a later attempt may succeed.
    """
    report = read_report(sr_path)
    message = build_oru(report, dest, control_id).to_er7()
    context = mllp_context(dest.tls) if dest.tls else None
    with patient_data_redacted(report):
        ack = send_message(dest.host, dest.port, message, control_id=control_id, timeout_s=dest.timeout_s,
                           ssl_context=context)
    log.info("ORU^R01 control_id=%s to %s:%d acknowledged %s (%d findings)", control_id, dest.host, dest.port,
             ack.code, len(report.groups))
    return report.redact(ack.summary())
