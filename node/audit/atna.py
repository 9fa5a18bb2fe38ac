"""Audit records as DICOM PS3.15 Annex A.5 audit messages (the XML IHE ATNA repositories expect).

`AtnaMapper.to_xml(record)` turns one record of the node's audit log into one `<AuditMessage>`
following the A.5.1 schema, filled in as A.5.3 asks for the matching event:

============================  =============================================  ======  ========
our event                     EventID (EventTypeCode)                        action  outcome
============================  =============================================  ======  ========
node-start / node-stop        110100 Application Activity (110120 / 110121)  E       0, 4 if not clean
association-accepted          110113 Security Alert (110126 Node Auth.)      E       0
association-rejected          110113 Security Alert (110126 Node Auth.)      E       4
tls-handshake-failed          110113 Security Alert (110126 Node Auth.)      E       4
instance-stored               110104 DICOM Instances Transferred             C       0
instance-duplicate            110104 DICOM Instances Transferred             R       0
instance-refused              110104 DICOM Instances Transferred             C       8
result-returned               110104 DICOM Instances Transferred             C       0, 8 refused
object-sent                   110104 DICOM Instances Transferred             R       0
send-failed                   110104 DICOM Instances Transferred             R       4, 8 final
report-sent                   110104 DICOM Instances Transferred             R       0
prior-fetched                 110104 DICOM Instances Transferred             C       0, 8 failed
commitment-confirmed/-failed  110104 DICOM Instances Transferred             R       0 / 4, 8 final
job-start                     110103 DICOM Instances Accessed                R       0
job-end                       110103 DICOM Instances Accessed                C       0/4/8
requeue                       110103 DICOM Instances Accessed                R       0
study-purged                  110105 DICOM Study Deleted                     D       0
============================  =============================================  ======  ========

Not sent (`NOT_FORWARDED`): commitment-requested (the transfer is already reported), presentation-context-refused, study-complete, rule-matched and
no-rule-matched. They are internal bookkeeping or negotiation results, not an access to patient
data by a participant, and A.5.3 has no message for them (A.5.3 does not require a message for
every activity); the local audit log keeps them.

110107 Import / 110106 Export are not used: A.5.3.5 / A.5.3.4 describe data entering or leaving
the control of the organisation's security domain (examples: media, film, e-mail, conversion for
an EHR). A C-STORE between the hospital's PACS and this node is a 110104 transfer inside the
domain. Sending to an external (de-identified, second-read) destination would be an Export once
such destinations exist. report-sent (an SR's content sent to the RIS as HL7 ORU or FHIR) is
reported as the transfer of that SR instance to the RIS, the nearest A.5.3 event. 110114 User Authentication is for persons logging in; a calling AE is a
node, reported by A.5.3.11's Node Authentication.

Patient IDs are allowed here (this is the record ATNA exists for). Records that carry a study but
no patient ID get it from `patient_lookup(study_uid)` or from what earlier records of this process
said (instance-stored carries both).
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import socket
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ainode.atna")


@dataclass(frozen=True)
class Code:
    """A coded value: csd-code, codeSystemName, originalText (the schema's CodedValueType)."""

    code: str
    system: str
    meaning: str


# EventID (DCM)
APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
INSTANCES_ACCESSED = Code("110103", "DCM", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DCM", "DICOM Study Deleted")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
# EventTypeCode
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
# RoleIDCode
APPLICATION = Code("110150", "DCM", "Application")
DESTINATION = Code("110152", "DCM", "Destination Role ID")
SOURCE = Code("110153", "DCM", "Source Role ID")
# ParticipantObjectIDTypeCode
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
NODE_ID = Code("110182", "DCM", "Node ID")

AUDIT_SOURCE_APPLICATION_SERVER = "4"  # A.5.1.2.1: application server process tier

OUTCOME_SUCCESS, OUTCOME_MINOR, OUTCOME_SERIOUS, OUTCOME_MAJOR = "0", "4", "8", "12"

NOT_FORWARDED = frozenset({"presentation-context-refused", "study-complete", "rule-matched", "no-rule-matched",
                           "commitment-requested"})


def _outcome(record: dict[str, Any], failure: str = OUTCOME_SERIOUS) -> str:
    return {"success": OUTCOME_SUCCESS, "interrupted": OUTCOME_MINOR}.get(str(record.get("outcome")), failure)


def _nap_type(address: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a machine name."""
    try:
        ipaddress.ip_address(address)
        return "2"
    except ValueError:
        return "1"


def _text(value: Any) -> str:
    return " ".join(str(value).split())  # the schema's tokens: no leading/trailing/double whitespace


@dataclass
class Participant:
    user_id: str
    requestor: bool
    role: Code | None = None
    alternative_user_id: str | None = None
    user_name: str | None = None
    access_point: str | None = None


@dataclass
class StudyRef:
    uid: str
    sop_class_uid: str | None = None  # None: unknown; SOPClass is still given for the instance count
    instances: list[str] = field(default_factory=list)
    count: int | None = None


@dataclass
class Message:
    """One audit message before rendering; `render` puts the parts in the schema's order."""

    event_id: Code
    action: str
    when: str
    outcome: str
    types: list[Code] = field(default_factory=list)
    outcome_description: str | None = None
    participants: list[Participant] = field(default_factory=list)
    studies: list[StudyRef] = field(default_factory=list)
    patient_id: str | None = None
    alert_subject: tuple[str, str] | None = None  # (node id, description) for 110113

    def render(self, source_id: str, site_id: str | None) -> ET.Element:
        root = ET.Element("AuditMessage")
        ev = ET.SubElement(root, "EventIdentification", EventActionCode=self.action,
                           EventDateTime=self.when, EventOutcomeIndicator=self.outcome)
        _code(ev, "EventID", self.event_id)
        for t in self.types:
            _code(ev, "EventTypeCode", t)
        if self.outcome_description:
            ET.SubElement(ev, "EventOutcomeDescription").text = self.outcome_description
        for p in self.participants:
            ap = ET.SubElement(root, "ActiveParticipant", UserID=_text(p.user_id),
                               UserIsRequestor="true" if p.requestor else "false")
            if p.alternative_user_id:
                ap.set("AlternativeUserID", p.alternative_user_id)
            if p.user_name:
                ap.set("UserName", p.user_name)
            if p.access_point:
                ap.set("NetworkAccessPointID", _text(p.access_point))
                ap.set("NetworkAccessPointTypeCode", _nap_type(p.access_point))
            if p.role is not None:
                _code(ap, "RoleIDCode", p.role)
        src = ET.SubElement(root, "AuditSourceIdentification", AuditSourceID=_text(source_id))
        if site_id:
            src.set("AuditEnterpriseSiteID", _text(site_id))
        ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": AUDIT_SOURCE_APPLICATION_SERVER})
        if self.patient_id:
            _object(root, self.patient_id, type_code="1", role="1", id_type=PATIENT_NUMBER)
        for s in self.studies:
            po = _object(root, s.uid, type_code="2", role="3", id_type=STUDY_INSTANCE_UID)
            n = s.count if s.count is not None else len(s.instances)
            if n or s.sop_class_uid:
                desc = ET.SubElement(po, "ParticipantObjectDescription")
                sop = ET.SubElement(desc, "SOPClass", NumberOfInstances=str(n))
                if s.sop_class_uid:
                    sop.set("UID", _text(s.sop_class_uid))
                for uid in s.instances:
                    ET.SubElement(sop, "Instance", UID=_text(uid))
        if self.alert_subject is not None:
            node_id, description = self.alert_subject
            po = _object(root, node_id, type_code="2", role="13", id_type=NODE_ID)  # 13: security resource
            ET.SubElement(po, "ParticipantObjectDetail", type="Alert Description",
                          value=base64.b64encode(description.encode("utf-8")).decode("ascii"))
        return root


def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                       "originalText": code.meaning})


def _object(root: ET.Element, object_id: str, *, type_code: str, role: str, id_type: Code) -> ET.Element:
    po = ET.SubElement(root, "ParticipantObjectIdentification", ParticipantObjectID=_text(object_id),
                       ParticipantObjectTypeCode=type_code, ParticipantObjectTypeCodeRole=role)
    _code(po, "ParticipantObjectIDTypeCode", id_type)
    return po


class AtnaMapper:
    """Audit-log record → PS3.15 A.5 XML. Thread-confined: use it from one thread (the forwarder's)."""

    def __init__(self, *, audit_source_id: str, enterprise_site_id: str | None = None,
                 node_host: str | None = None,
                 patient_lookup: Callable[[str], str | None] | None = None,
                 remember_patients: int = 10000) -> None:
        self.audit_source_id = audit_source_id
        self.enterprise_site_id = enterprise_site_id
        self.node_host = node_host or socket.gethostname()
        self.patient_lookup = patient_lookup
        self._patients: OrderedDict[str, str] = OrderedDict()
        self._remember = remember_patients
        self._builders: dict[str, Callable[[dict[str, Any]], Message]] = {
            "node-start": self._application, "node-stop": self._application,
            "association-accepted": self._node_authentication,
            "association-rejected": self._node_authentication,
            "instance-stored": self._received, "instance-duplicate": self._received,
            "instance-refused": self._received, "result-returned": self._received,
            "object-sent": self._sent, "send-failed": self._sent, "report-sent": self._sent,
            "tls-handshake-failed": self._node_authentication,
            "job-start": self._job, "job-end": self._job,
            "requeue": self._requeue,
            "prior-fetched": self._prior,
            "commitment-confirmed": self._commitment, "commitment-failed": self._commitment,
            "study-purged": self._purged,
        }

    def forwards(self, event: str | None) -> bool:
        return event in self._builders

    @property
    def events(self) -> Iterable[str]:
        return self._builders.keys()

    def message(self, record: dict[str, Any]) -> ET.Element | None:
        """The `<AuditMessage>` for `record`, or None for events that are not sent (NOT_FORWARDED, unknown)."""
        self._learn(record)
        build = self._builders.get(str(record.get("event")))
        if build is None:
            return None
        return build(record).render(self.audit_source_id, self.enterprise_site_id)

    def to_xml(self, record: dict[str, Any]) -> bytes | None:
        root = self.message(record)
        return None if root is None else ET.tostring(root, encoding="utf-8", xml_declaration=True)

    # ---- helpers -------------------------------------------------------

    def _learn(self, record: dict[str, Any]) -> None:
        study, patient = record.get("study_uid"), record.get("patient_id")
        if study and patient:
            self._patients[str(study)] = str(patient)
            self._patients.move_to_end(str(study))
            while len(self._patients) > self._remember:
                self._patients.popitem(last=False)

    def _patient(self, record: dict[str, Any]) -> str | None:
        if record.get("patient_id"):
            return str(record["patient_id"])
        study = record.get("study_uid")
        if not study:
            return None
        if (known := self._patients.get(str(study))) is not None:
            return known
        if self.patient_lookup is not None:
            try:
                found = self.patient_lookup(str(study))
            except Exception as exc:  # noqa: BLE001 - a lookup failure costs the Patient object only
                log.warning("ATNA: patient lookup failed (%s); message sent without the patient",
                            type(exc).__name__)
                return None
            if found:
                self._learn({"study_uid": study, "patient_id": found})
                return str(found)
        return None

    def _node(self, record: dict[str, Any], *, requestor: bool, role: Code | None = None,
              user_name: str | None = None) -> Participant:
        ae = str(record.get("node") or self.audit_source_id)
        return Participant(ae, requestor, role, alternative_user_id=f"AETITLES={ae}", user_name=user_name,
                           access_point=self.node_host)

    @staticmethod
    def _peer(ae: Any, address: Any, *, requestor: bool, role: Code | None = None) -> Participant:
        ae_s = str(ae or "-")
        return Participant(ae_s, requestor, role, alternative_user_id=f"AETITLES={ae_s}" if ae else None,
                           access_point=str(address) if address else None)

    def _base(self, record: dict[str, Any], event_id: Code, action: str, outcome: str,
              types: list[Code] | None = None, description: str | None = None) -> Message:
        return Message(event_id, action, str(record["ts"]), outcome, types or [],
                       outcome_description=description)

    # ---- one builder per family (A.5.3 section in the docstring) ---------

    def _application(self, r: dict[str, Any]) -> Message:
        """A.5.3.1 Application Activity: the node (RoleIDCode 110150 Application) started or stopped.

        Who launched it is not known to the node, so the optional Application Launcher is left out.
        """
        start = r["event"] == "node-start"
        unclean = not start and not r.get("clean", True)
        outcome = OUTCOME_MINOR if unclean else _outcome(r)
        m = self._base(r, APPLICATION_ACTIVITY, "E", outcome, [APPLICATION_START if start else APPLICATION_STOP],
                       "stopped with jobs cut off; they run again at the next start" if unclean else None)
        m.participants.append(self._node(r, requestor=False, role=APPLICATION))
        return m

    def _node_authentication(self, r: dict[str, Any]) -> Message:
        """A.5.3.11 Security Alert, EventTypeCode 110126 Node Authentication: a peer asked for an association.

        A.5.3.11's note says Node Authentication reports successes and failures, every DICOM
        association being one; 110114 User Authentication is for persons logging in, which a
        calling AE is not. Accepted: outcome 0 (an informative alert). Rejected by the node's access
        rules or its association limit: outcome 4, "mitigation efforts were effective"; the Alert
        Description says which. The peer node (Node ID: its IP address) is the alert subject; the
        performing peer's UserIsRequestor is false, as A.5.3.11 requires.
        """
        accepted = r["event"] == "association-accepted"
        calling = r.get("calling_ae")
        if accepted:
            description = f"association accepted from calling AE {calling or '-'}"
        elif r["event"] == "tls-handshake-failed":
            description = f"TLS handshake failed: {r.get('reason') or 'no reason recorded'}"
        else:
            description = f"association rejected: {r.get('reason') or 'no reason recorded'}"
        m = self._base(r, SECURITY_ALERT, "E", OUTCOME_SUCCESS if accepted else OUTCOME_MINOR,
                       [NODE_AUTHENTICATION], None if accepted else description)
        m.participants.append(self._node(r, requestor=False))  # the reporting process
        m.participants.append(self._peer(calling, r.get("peer_ip"), requestor=False))  # performing
        m.alert_subject = (str(r.get("peer_ip") or calling or "unknown"), description)
        return m

    def _received(self, r: dict[str, Any]) -> Message:
        """A.5.3.7 DICOM Instances Transferred, the node being the receiver (Destination 110152).

        Action C for a new instance, R for a duplicate the node already held unchanged (A.5.3.7's
        rule for a receiver that already holds the copy), C with outcome 8 for a refused one (the
        store was attempted and did not happen).
        """
        event = r["event"]
        action = "R" if event == "instance-duplicate" else "C"
        refused = event == "instance-refused"
        description = None
        if refused:
            description = " ".join(x for x in (str(r.get("status") or ""), str(r.get("reason") or "")) if x) or None
        m = self._base(r, INSTANCES_TRANSFERRED, action, OUTCOME_SERIOUS if refused else _outcome(r),
                       description=description)
        m.participants.append(self._peer(r.get("calling_ae"), r.get("peer_ip"), requestor=True, role=SOURCE))
        m.participants.append(self._node(r, requestor=False, role=DESTINATION))
        if r.get("study_uid"):
            sop = [str(r["sop_instance_uid"])] if r.get("sop_instance_uid") else []
            m.studies.append(StudyRef(str(r["study_uid"]), r.get("sop_class_uid"), sop))
        m.patient_id = self._patient(r)
        return m

    def _sent(self, r: dict[str, Any]) -> Message:
        """A.5.3.7 DICOM Instances Transferred, the node being the sender (Source 110153).

        Action R: A.5.3.7 asks a source that cannot know what the receiver held to use Read.
        A failed send is minor (4) while it will be retried, serious (8) when the node gave up.
        """
        failed = r["event"] == "send-failed"
        outcome = (OUTCOME_SERIOUS if r.get("final") else OUTCOME_MINOR) if failed else _outcome(r)
        m = self._base(r, INSTANCES_TRANSFERRED, "R", outcome,
                       description=str(r.get("error"))[:500] if failed and r.get("error") else None)
        m.participants.append(self._node(r, requestor=True, role=SOURCE))
        dest = r.get("dest_ae") or r.get("destination")
        m.participants.append(self._peer(dest, r.get("dest_host"), requestor=False, role=DESTINATION))
        if r.get("study_uid"):
            sop = [str(r["sop_instance_uid"])] if r.get("sop_instance_uid") else []
            m.studies.append(StudyRef(str(r["study_uid"]), r.get("sop_class_uid"), sop))
        m.patient_id = self._patient(r)
        return m

    def _job(self, r: dict[str, Any]) -> Message:
        """A.5.3.6 DICOM Instances Accessed by the node on behalf of an AI plugin.

        job-start: the plugin reads the study (R). job-end: the node creates derived instances (SR,
        SEG, ...) in the study (C); the outcome says whether it did (0), was cut off and will run
        again (4) or failed (8). The plugin is named in UserName. A.5.3.6 records studies, not
        instances: the created instances are only counted (SOPClass/@NumberOfInstances).
        """
        start = r["event"] == "job-start"
        description = None
        if not start and r.get("outcome") != "success":
            description = str(r.get("error") or r.get("reason") or "")[:500] or None
        m = self._base(r, INSTANCES_ACCESSED, "R" if start else "C", _outcome(r), description=description)
        plugin = r.get("plugin")
        m.participants.append(self._node(r, requestor=True, user_name=f"plugin {plugin}" if plugin else None))
        if r.get("study_uid"):
            outputs = r.get("outputs")
            m.studies.append(StudyRef(str(r["study_uid"]), count=len(outputs) if isinstance(outputs, list) else None))
        m.patient_id = self._patient(r)
        return m

    def _prior(self, r: dict[str, Any]) -> Message:
        """A.5.3.7 DICOM Instances Transferred: the node retrieved (C-GET) a prior study of the patient from
        a PACS, for a plugin. The node is the requestor and the destination; the prior study is the object
        (the current study is named in the description). Failure: outcome 8 with the error."""
        failed = r.get("outcome") not in (None, "success")
        description = str(r.get("error"))[:500] if failed and r.get("error") else (
            f"prior for study {r.get('study_uid')} (job {r.get('job_id')})")
        m = self._base(r, INSTANCES_TRANSFERRED, "C", OUTCOME_SERIOUS if failed else _outcome(r),
                       description=description)
        m.participants.append(self._peer(r.get("source_ae"), None, requestor=False, role=SOURCE))
        m.participants.append(self._node(r, requestor=True, role=DESTINATION))
        study = r.get("prior_study_uid") or r.get("study_uid")
        if study:
            m.studies.append(StudyRef(str(study), count=r.get("instances") if isinstance(r.get("instances"), int)
                                      else None))
        m.patient_id = self._patient({"study_uid": r.get("study_uid"), "patient_id": r.get("patient_id")})
        return m

    def _commitment(self, r: dict[str, Any]) -> Message:
        """A.5.3.7 DICOM Instances Transferred (action R, the node the source): the PACS's storage commitment
        report on objects the node sent. Confirmed: 0; failed while the node resends: 4; given up: 8.
        (commitment-requested is not sent: the transfer itself was already reported as object-sent.)"""
        failed = r["event"] == "commitment-failed"
        outcome = (OUTCOME_SERIOUS if r.get("final") or r.get("dead_letter") else OUTCOME_MINOR) if failed \
            else _outcome(r)
        description = f"storage commitment {'failed' if failed else 'confirmed'}, transaction {r.get('transaction_uid')}"
        if failed and r.get("error"):
            description += f": {str(r['error'])[:400]}"
        m = self._base(r, INSTANCES_TRANSFERRED, "R", outcome, description=description)
        m.participants.append(self._node(r, requestor=True, role=SOURCE))
        m.participants.append(self._peer(r.get("reported_by") or r.get("destination"), None, requestor=False,
                                         role=DESTINATION))
        studies = r.get("study_uids") or ([r["study_uid"]] if r.get("study_uid") else [])
        for study in studies:
            m.studies.append(StudyRef(str(study), count=len(r.get("sop_instance_uids") or []) or None))
        if len(studies) == 1:
            m.patient_id = self._patient({"study_uid": studies[0]})
        return m

    def _requeue(self, r: dict[str, Any]) -> Message:
        """A.5.3.6 DICOM Instances Accessed: an operator had a job run or its results sent again.

        The operator (requested_by) is the requestor; the node performs the access.
        """
        counts = {k: len(v) for k in ("resent", "rerun", "skipped") if isinstance(v := r.get(k), list)}
        description = ", ".join(f"{k} {n}" for k, n in counts.items()) or None
        m = self._base(r, INSTANCES_ACCESSED, "R", _outcome(r), description=description)
        m.participants.append(Participant(str(r.get("requested_by") or "operator"), True))
        m.participants.append(self._node(r, requestor=False))
        if r.get("study_uid"):
            m.studies.append(StudyRef(str(r["study_uid"])))
        m.patient_id = self._patient(r)
        return m

    def _purged(self, r: dict[str, Any]) -> Message:
        """A.5.3.8 DICOM Study Deleted: retention removed the study's instances from the node."""
        m = self._base(r, STUDY_DELETED, "D", _outcome(r))
        m.participants.append(self._node(r, requestor=True))
        n = r.get("instances")
        m.studies.append(StudyRef(str(r.get("study_uid") or "unknown"), count=n if isinstance(n, int) else None))
        m.patient_id = self._patient(r)
        return m
