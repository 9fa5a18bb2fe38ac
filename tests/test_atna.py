"""ATNA: audit records reach a loopback syslog receiver as DICOM PS3.15 A.5 messages, over TCP and TLS.

`schema_errors` encodes what the A.5.1 schema (RELAX NG compact, PS3.15 A.5.1.1) requires: the
elements, their order and cardinality, the required attributes and their enumerated values. The
schema text is not vendored (the machine has no internet); the rules below were transcribed from it.
One deliberate difference: the A.5.1.1 text makes ParticipantObjectName|ParticipantObjectQuery
mandatory while every A.5.3 table (and RFC 3881) marks the name optional; it is treated as optional.
`event_errors` adds A.5.3's rules for the message of each EventID the node sends.
"""

from __future__ import annotations

import base64
import logging
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from pydantic import ValidationError

from node.audit import (AtnaConfigError, AtnaForwarder, AtnaMapper, AtnaSection, AuditLog, SyslogForwarder,
                        build_atna_forwarder, verify_log)
from node.audit.atna import NOT_FORWARDED
from node.audit.log import canonical
from node.audit.syslog import octet_frame, rfc5424
from node.config.schema import Strict
from tests.support.net import free_port
from tests.support.syslog_listener import SyslogListener, parse_rfc5424, split_frames

PATIENT = "PAT-0042"
STUDY = "1.2.826.0.1.3680043.8.498.1"
CT = "1.2.840.10008.5.1.4.1.1.2"

# ---- A.5.1 schema rules ------------------------------------------------------------------------------

_DATETIME = re.compile(r"-?\d{4,}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})?\Z")
_CODED = {"required": {"csd-code", "codeSystemName", "originalText"}, "optional": {"displayName"}}


def _attrs(el: ET.Element, required: set[str], optional: set[str], errors: list[str], where: str) -> None:
    for a in sorted(required - el.attrib.keys()):
        errors.append(f"{where}: missing attribute {a}")
    for a in sorted(el.attrib.keys() - required - optional):
        errors.append(f"{where}: attribute {a} is not in the schema")


def _coded(el: ET.Element, errors: list[str], where: str) -> None:
    _attrs(el, _CODED["required"], _CODED["optional"], errors, where)
    if len(el):
        errors.append(f"{where}: a coded value has no child elements")


def _sequence(el: ET.Element, pattern: list[tuple[set[str], int, float]], errors: list[str], where: str) -> None:
    """Children must follow `pattern`: (tags of one group, min, max) in order."""
    children = [c.tag for c in el]
    i = 0
    for tags, lo, hi in pattern:
        n = 0
        while i < len(children) and children[i] in tags and n < hi:
            i, n = i + 1, n + 1
        if n < lo:
            errors.append(f"{where}: expected {lo}+ of {sorted(tags)} at child {i}, found "
                          f"{children[i] if i < len(children) else 'nothing'}")
            return
    if i < len(children):
        errors.append(f"{where}: unexpected or misplaced child {children[i]} (children: {children})")


def _enum(el: ET.Element, attr: str, values: set[str], errors: list[str], where: str) -> None:
    if attr in el.attrib and el.attrib[attr] not in values:
        errors.append(f"{where}: {attr}={el.attrib[attr]!r} not one of {sorted(values)}")


def schema_errors(root: ET.Element) -> list[str]:
    errors: list[str] = []
    if root.tag != "AuditMessage":
        return [f"root is {root.tag}, not AuditMessage"]
    _attrs(root, set(), set(), errors, "AuditMessage")
    _sequence(root, [({"EventIdentification"}, 1, 1), ({"ActiveParticipant"}, 1, float("inf")),
                     ({"AuditSourceIdentification"}, 1, 1),
                     ({"ParticipantObjectIdentification"}, 0, float("inf"))], errors, "AuditMessage")
    for ev in root.findall("EventIdentification"):
        _attrs(ev, {"EventDateTime", "EventOutcomeIndicator"}, {"EventActionCode"}, errors, "EventIdentification")
        _enum(ev, "EventActionCode", {"C", "R", "U", "D", "E"}, errors, "EventIdentification")
        _enum(ev, "EventOutcomeIndicator", {"0", "4", "8", "12"}, errors, "EventIdentification")
        if not _DATETIME.match(ev.get("EventDateTime", "")):
            errors.append(f"EventDateTime {ev.get('EventDateTime')!r} is not an xsd:dateTime")
        _sequence(ev, [({"EventID"}, 1, 1), ({"EventTypeCode"}, 0, float("inf")),
                       ({"EventOutcomeDescription"}, 0, 1)], errors, "EventIdentification")
        for c in ev:
            if c.tag in ("EventID", "EventTypeCode"):
                _coded(c, errors, c.tag)
    for ap in root.findall("ActiveParticipant"):
        _attrs(ap, {"UserID", "UserIsRequestor"},
               {"AlternativeUserID", "UserName", "NetworkAccessPointID", "NetworkAccessPointTypeCode"},
               errors, "ActiveParticipant")
        _enum(ap, "UserIsRequestor", {"true", "false", "1", "0"}, errors, "ActiveParticipant")
        _enum(ap, "NetworkAccessPointTypeCode", {"1", "2", "3", "4", "5"}, errors, "ActiveParticipant")
        _sequence(ap, [({"RoleIDCode"}, 0, float("inf")), ({"MediaIdentifier"}, 0, 1)], errors, "ActiveParticipant")
        for c in ap.findall("RoleIDCode"):
            _coded(c, errors, "RoleIDCode")
    for src in root.findall("AuditSourceIdentification"):
        _attrs(src, {"AuditSourceID"}, {"AuditEnterpriseSiteID"}, errors, "AuditSourceIdentification")
        _sequence(src, [({"AuditSourceTypeCode"}, 0, float("inf"))], errors, "AuditSourceIdentification")
        for c in src:
            if "codeSystemName" in c.attrib:
                _coded(c, errors, "AuditSourceTypeCode")
            else:
                _attrs(c, {"csd-code"}, set(), errors, "AuditSourceTypeCode")
    for po in root.findall("ParticipantObjectIdentification"):
        w = "ParticipantObjectIdentification"
        _attrs(po, {"ParticipantObjectID"}, {"ParticipantObjectTypeCode", "ParticipantObjectTypeCodeRole",
                                             "ParticipantObjectDataLifeCycle", "ParticipantObjectSensitivity"},
               errors, w)
        _enum(po, "ParticipantObjectTypeCode", {"1", "2", "3", "4"}, errors, w)
        _enum(po, "ParticipantObjectTypeCodeRole", {str(i) for i in range(1, 27)}, errors, w)
        _enum(po, "ParticipantObjectDataLifeCycle", {str(i) for i in range(1, 16)}, errors, w)
        _sequence(po, [({"ParticipantObjectIDTypeCode"}, 1, 1),
                       ({"ParticipantObjectName", "ParticipantObjectQuery"}, 0, 1),
                       ({"ParticipantObjectDetail"}, 0, float("inf")),
                       ({"ParticipantObjectDescription"}, 0, float("inf"))], errors, w)
        for c in po.findall("ParticipantObjectIDTypeCode"):
            _coded(c, errors, "ParticipantObjectIDTypeCode")
        for d in po.findall("ParticipantObjectDetail"):
            _attrs(d, {"type", "value"}, set(), errors, "ParticipantObjectDetail")
            try:
                base64.b64decode(d.get("value", ""), validate=True)
            except ValueError:
                errors.append("ParticipantObjectDetail/@value is not base64")
        for desc in po.findall("ParticipantObjectDescription"):
            _sequence(desc, [({"MPPS"}, 0, float("inf")), ({"Accession"}, 0, float("inf")),
                             ({"SOPClass"}, 0, float("inf")), ({"ParticipantObjectContainsStudy"}, 0, 1),
                             ({"Encrypted"}, 0, 1), ({"Anonymized"}, 0, 1)], errors, "ParticipantObjectDescription")
            for sop in desc.findall("SOPClass"):
                _attrs(sop, {"NumberOfInstances"}, {"UID"}, errors, "SOPClass")
                if not sop.get("NumberOfInstances", "").isdigit():
                    errors.append("SOPClass/@NumberOfInstances is not an integer")
                _sequence(sop, [({"Instance"}, 0, float("inf"))], errors, "SOPClass")
                for inst in sop:
                    _attrs(inst, {"UID"}, set(), errors, "Instance")
    return errors


# ---- A.5.3 rules per message ------------------------------------------------------------------------

def _objects(root: ET.Element, type_code: str, role: str | None, id_type: str) -> list[ET.Element]:
    return [po for po in root.findall("ParticipantObjectIdentification")
            if po.get("ParticipantObjectTypeCode") == type_code
            and (role is None or po.get("ParticipantObjectTypeCodeRole") == role)
            and po.find("ParticipantObjectIDTypeCode").get("csd-code") == id_type]


def _roles(root: ET.Element, code: str) -> list[ET.Element]:
    return [ap for ap in root.findall("ActiveParticipant") if any(r.get("csd-code") == code for r in ap.findall("RoleIDCode"))]


def event_errors(root: ET.Element) -> list[str]:
    ev = root.find("EventIdentification")
    event_id = ev.find("EventID").get("csd-code")
    action = ev.get("EventActionCode")
    types = {t.get("csd-code") for t in ev.findall("EventTypeCode")}
    errors: list[str] = []
    if ev.find("EventID").get("codeSystemName") != "DCM":
        errors.append("EventID is not a DCM code")
    studies = _objects(root, "2", "3", "110180")
    patients = _objects(root, "1", "1", "2")
    if event_id == "110100":  # A.5.3.1
        if action != "E" or not types <= {"110120", "110121"} or len(types) != 1:
            errors.append(f"Application Activity: action {action}, types {types}")
        if len(_roles(root, "110150")) != 1:
            errors.append("Application Activity needs one participant with RoleIDCode 110150")
    elif event_id == "110104":  # A.5.3.7
        if action not in {"C", "R", "U"}:
            errors.append(f"Instances Transferred: action {action}")
        if len(_roles(root, "110153")) != 1 or len(_roles(root, "110152")) != 1:
            errors.append("Instances Transferred needs one Source (110153) and one Destination (110152)")
        if not studies or len(patients) != 1:
            errors.append(f"Instances Transferred needs studies (1..N) and one patient: {len(studies)}, {len(patients)}")
    elif event_id == "110103":  # A.5.3.6
        if action not in {"C", "R", "U", "D"}:
            errors.append(f"Instances Accessed: action {action}")
        if not 1 <= len(root.findall("ActiveParticipant")) <= 2:
            errors.append("Instances Accessed has 1..2 active participants")
        if not studies or len(patients) != 1:
            errors.append("Instances Accessed needs studies (1..N) and one patient")
    elif event_id == "110105":  # A.5.3.8
        if action != "D" or not studies or len(patients) != 1:
            errors.append("Study Deleted: action D, studies and one patient")
    elif event_id == "110113":  # A.5.3.11
        if action != "E" or not types:
            errors.append("Security Alert: action E and an EventTypeCode")
        for po in root.findall("ParticipantObjectIdentification"):
            if po.get("ParticipantObjectTypeCode") != "2" or \
                    po.find("ParticipantObjectIDTypeCode").get("csd-code") not in {"12", "110182"}:
                errors.append("Security Alert: alert subjects are system objects with ID type 12 or 110182")
            if not any(d.get("type") == "Alert Description" for d in po.findall("ParticipantObjectDetail")):
                errors.append("Security Alert: an alert subject needs ParticipantObjectDetail 'Alert Description'")
    else:
        errors.append(f"EventID {event_id} is not one the node sends")
    return errors


def validate(xml: str) -> ET.Element:
    root = ET.fromstring(xml.encode("utf-8"))
    errors = schema_errors(root) + event_errors(root)
    assert not errors, "\n".join(errors) + "\n" + xml
    return root


# ---- records of every event type, with the fields the node writes ------------------------------------

def append_all(log: AuditLog) -> list[dict]:
    """One record of each event type, in a plausible order. Returns the records as appended."""
    a = log.append
    return [
        a("node-start", config="node.yaml", reconcile_s=0.01),
        a("association-rejected", "failure", calling_ae="ROGUE", peer_ip="10.1.2.3", peer_port=40000,
          reason="calling AE title 'ROGUE' is not in node.allowed_calling_aes"),
        a("association-accepted", calling_ae="ORTHANC", peer_ip="127.0.0.1", peer_port=40001),
        a("presentation-context-refused", "failure", calling_ae="ORTHANC", peer_ip="127.0.0.1", peer_port=40001,
          sop_classes=["1.2.3"], reason="not supported"),
        a("instance-stored", calling_ae="ORTHANC", peer_ip="127.0.0.1", patient_id=PATIENT, study_uid=STUDY,
          series_uid=STUDY + ".1", sop_instance_uid=STUDY + ".1.1", sop_class_uid=CT,
          transfer_syntax="1.2.840.10008.1.2.1", bytes=525000),
        a("instance-duplicate", calling_ae="ORTHANC", peer_ip="127.0.0.1", study_uid=STUDY,
          series_uid=STUDY + ".1", sop_instance_uid=STUDY + ".1.1"),
        a("instance-refused", "failure", calling_ae="ORTHANC", peer_ip="127.0.0.1", sop_instance_uid="1.9",
          study_uid=STUDY, status="0xA700", reason="out of disk space"),
        a("study-complete", study_uid=STUDY, reason="quiet-period", instances=1, revision=1),
        a("no-rule-matched", study_uid=STUDY, series=1, rules_evaluated=1),
        a("rule-matched", study_uid=STUDY, rule="chest", plugin="ct_lung", priority="routine",
          series_uid=STUDY + ".1", job_id=1, destinations=["pacs"]),
        a("job-start", study_uid=STUDY, job_id=1, plugin="ct_lung", rule="chest", attempt=1,
          series_uids=[STUDY + ".1"]),
        a("job-end", study_uid=STUDY, job_id=1, plugin="ct_lung", plugin_version="1.0",
          outputs=[{"kind": "sr", "sop_instance_uid": "2.25.1", "series_uid": "2.25.2"}], summary="ok"),
        a("job-end", "interrupted", study_uid=STUDY, job_id=2, plugin="ct_lung", reason="node stopping"),
        a("job-end", "failure", study_uid=STUDY, job_id=3, plugin="ct_lung", error="CUDA out of memory"),
        a("object-sent", study_uid=STUDY, job_id=1, destination="pacs", dest_ae="PACS", dest_host="127.0.0.1",
          dest_port=4242, kind="sr", sop_instance_uid="2.25.1", attempt=1),
        a("send-failed", "failure", study_uid=STUDY, job_id=1, destination="pacs", kind="seg",
          sop_instance_uid="2.25.3", attempt=1, error="connection refused", final=False, retry_in_s=2.0),
        a("send-failed", "failure", study_uid=STUDY, job_id=1, destination="pacs", kind="seg",
          sop_instance_uid="2.25.3", attempt=5, error="connection refused", final=True),
        a("requeue", request_id=1, requested_by="it-admin", job_id=1, study_uid=STUDY, resent=[3], rerun=[],
          skipped=[]),
        a("study-purged", study_uid=STUDY, instances=1, files_removed=1, result_files_removed=2,
          retention_hours=168),
        a("report-sent", study_uid=STUDY, job_id=1, destination="ris", kind="ORU", sop_instance_uid="2.25.1",
          attempt=1, ack="AA AIN1", dest_host="127.0.0.1", dest_port=2575),
        a("prior-fetched", study_uid=STUDY, job_id=1, prior_study_uid=STUDY + ".0", series_uids=[STUDY + ".0.1"],
          instances=12, source="pacs", source_ae="PACS"),
        a("prior-fetched", "failure", study_uid=STUDY, job_id=2, source="pacs", source_ae="PACS",
          error="cannot connect to PACS@127.0.0.1:104"),
        a("tls-handshake-failed", "failure", peer_ip="127.0.0.1", peer_port=50000, reason="certificate unknown"),
        a("commitment-requested", destination="pacs", dest_ae="PACS", dest_host="127.0.0.1", dest_port=4242,
          transaction_uid="2.25.9", attempt=1, replaces=None, sop_instance_uids=["2.25.1"], job_ids=[1],
          study_uid=STUDY),
        a("commitment-confirmed", destination="pacs", transaction_uid="2.25.9", reported_by="PACS",
          sop_instance_uids=["2.25.1"], job_ids=[1], study_uid=STUDY),
        a("commitment-failed", "failure", destination="pacs", transaction_uid="2.25.9", attempt=5,
          error="no report", final=True, sop_instance_uids=["2.25.1"], job_ids=[1], study_uid=STUDY),
        a("result-returned", calling_ae="CLOUD", peer_ip="127.0.0.1", destination="cloud", study_uid=STUDY,
          patient_id=PATIENT, sop_instance_uid="2.25.7", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", job_id=1,
          forwarded_to=["pacs"]),
        a("node-stop", clean=False),
    ]


EXPECTED = {  # event -> (EventID, action, outcome) as documented in node/audit/atna.py
    "node-start": ("110100", "E", "0"), "association-rejected": ("110113", "E", "4"),
    "association-accepted": ("110113", "E", "0"), "instance-stored": ("110104", "C", "0"),
    "instance-duplicate": ("110104", "R", "0"), "instance-refused": ("110104", "C", "8"),
    "job-start": ("110103", "R", "0"), "object-sent": ("110104", "R", "0"),
    "requeue": ("110103", "R", "0"), "study-purged": ("110105", "D", "0"), "node-stop": ("110100", "E", "4"),
    "report-sent": ("110104", "R", "0"), "result-returned": ("110104", "C", "0"), "tls-handshake-failed": ("110113", "E", "4"),
}


def expected_for(rec: dict) -> tuple[str, str, str]:
    if rec["event"] == "job-end":
        return "110103", "C", {"success": "0", "interrupted": "4", "failure": "8"}[rec["outcome"]]
    if rec["event"] == "send-failed":
        return "110104", "R", "8" if rec["final"] else "4"
    if rec["event"] == "commitment-confirmed":
        return "110104", "R", "0"
    if rec["event"] == "commitment-failed":
        return "110104", "R", "8" if rec.get("final") else "4"
    if rec["event"] == "prior-fetched":
        return "110104", "C", "0" if rec["outcome"] == "success" else "8"
    return EXPECTED[rec["event"]]


def make_forwarder(port: int, **kw):  # type: ignore[no-untyped-def]
    mapper = AtnaMapper(audit_source_id="AINODE", enterprise_site_id="Test Hospital", node_host="ainode.test")
    sender = SyslogForwarder(
        "127.0.0.1", port, render=mapper.to_xml, hostname="ainode.test",
        **{"backoff_initial_s": 0.02, "backoff_max_s": 0.1, "connect_timeout_s": 1.0, **kw})
    return sender


def file_records(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


# ---- tests -------------------------------------------------------------------------------------------

def test_every_forwarded_event_arrives_as_valid_rfc5424_and_ps3_15(tmp_path):
    with SyslogListener() as listener:
        forwarder = build_atna_forwarder(
            AtnaSection(host="127.0.0.1", port=listener.port, transport="tcp", enterprise_site_id="Test Hospital"),
            node_ae="AINODE", hostname="ainode.test")
        log = AuditLog(tmp_path / "audit.jsonl", node_ae="AINODE", forward=forwarder)
        records = append_all(log)
        log.close()
        assert forwarder.flush(5)
        forwarded = [r for r in records if r["event"] not in NOT_FORWARDED]
        messages = listener.wait_for(len(forwarded))
        forwarder.close()
    assert not listener.errors
    assert len(messages) == len(forwarded)
    for rec, msg in zip(forwarded, messages):
        assert (msg.pri, msg.facility, msg.severity, msg.version) == (85, 10, 5, 1)
        assert (msg.hostname, msg.app_name, msg.msgid, msg.structured_data) == (
            "ainode.test", "ainode", "IHE+RFC-3881", "-")
        assert msg.has_bom and msg.procid.isdigit()
        root = validate(msg.text)
        ev = root.find("EventIdentification")
        got = (ev.find("EventID").get("csd-code"), ev.get("EventActionCode"), ev.get("EventOutcomeIndicator"))
        assert got == expected_for(rec), rec["event"]
        assert ev.get("EventDateTime") == rec["ts"]
        assert root.find("AuditSourceIdentification").attrib == {
            "AuditSourceID": "AINODE", "AuditEnterpriseSiteID": "Test Hospital"}
    by_event = {rec["event"]: ET.fromstring(msg.text.encode()) for rec, msg in zip(forwarded, messages)}
    stored = by_event["instance-stored"]
    assert stored.find("ActiveParticipant").get("UserID") == "ORTHANC"
    assert stored.find(".//SOPClass").attrib == {"UID": CT, "NumberOfInstances": "1"}
    # the patient, learnt from instance-stored, is named in later messages about the same study
    assert _objects(by_event["study-purged"], "1", "1", "2")[0].get("ParticipantObjectID") == PATIENT
    alert = by_event["association-rejected"].find(".//ParticipantObjectDetail")
    assert b"ROGUE" in base64.b64decode(alert.get("value"))
    assert verify_log(tmp_path / "audit.jsonl").ok


def test_forwarding_leaves_the_audit_log_unchanged(tmp_path):
    seen: list[dict] = []

    def vandal(record: dict) -> None:  # a listener that mutates what it gets must not reach the log
        seen.append(dict(record))
        record.clear()

    log = AuditLog(tmp_path / "audit.jsonl", node_ae="AINODE", forward=vandal)
    records = append_all(log)
    log.close()
    assert [canonical(r) for r in records] == file_records(tmp_path / "audit.jsonl")
    assert seen == records
    assert verify_log(tmp_path / "audit.jsonl").ok


def test_a_failing_listener_never_breaks_an_append_or_logs_patient_data(tmp_path, caplog):
    def broken(record: dict) -> None:
        raise RuntimeError(f"boom {record.get('patient_id')}")

    log = AuditLog(tmp_path / "audit.jsonl", node_ae="AINODE")
    log.add_listener(broken)
    with caplog.at_level(logging.WARNING):
        records = append_all(log)
    log.close()
    assert len(file_records(tmp_path / "audit.jsonl")) == len(records)
    assert verify_log(tmp_path / "audit.jsonl").ok
    assert "RuntimeError" in caplog.text and PATIENT not in caplog.text


def test_tls_with_client_certificate(tmp_path, pki):
    server_ctx = pki.server_context(require_client_cert=True)
    with SyslogListener(ssl_context=server_ctx) as listener:
        section = AtnaSection(host="127.0.0.1", port=listener.port, transport="tls", ca_file=Path("ca.pem"),
                              cert_file=Path("client.pem"), key_file=Path("client.key"), include_bom=False)
        forwarder = build_atna_forwarder(section, node_ae="AINODE", base=pki.dir)
        log = AuditLog(tmp_path / "audit.jsonl", node_ae="AINODE", forward=forwarder)
        log.append("node-start")
        log.append("instance-stored", calling_ae="ORTHANC", peer_ip="127.0.0.1", patient_id=PATIENT,
                   study_uid=STUDY, sop_instance_uid=STUDY + ".1.1", sop_class_uid=CT)
        messages = listener.wait_for(2)
        forwarder.close()
        log.close()
    assert not listener.errors and not any(m.has_bom for m in messages)
    assert [validate(m.text).find("EventIdentification/EventID").get("csd-code") for m in messages] == [
        "110100", "110104"]
    assert any(("commonName", "ainode-client") in rdn for c in listener.peer_certs for rdn in c["subject"])


def test_tls_receiver_with_an_untrusted_certificate_gets_nothing(tmp_path, pki, caplog):
    other = tmp_path / "other-ca.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(tmp_path / "other.key"), "-out", str(other), "-days", "2", "-subj", "/CN=other-ca")
    with SyslogListener(ssl_context=pki.server_context()) as listener:
        forwarder = build_atna_forwarder(
            AtnaSection(host="127.0.0.1", port=listener.port, ca_file=other), node_ae="AINODE")
        with caplog.at_level(logging.WARNING):
            forwarder({"event": "node-start", "outcome": "success", "ts": "2026-01-01T00:00:00+00:00"})
            assert not forwarder.flush(0.5)
            forwarder.close(0.2)
    assert listener.messages == []
    assert "certificate" in caplog.text.lower() and f"127.0.0.1:{listener.port}" in caplog.text


def test_messages_wait_for_a_receiver_that_comes_up_later_and_survive_its_restart(tmp_path):
    port = free_port()
    sender = make_forwarder(port)
    log = AuditLog(tmp_path / "audit.jsonl", node_ae="AINODE", forward=sender)
    try:
        log.append("node-start")
        log.append("association-accepted", calling_ae="ORTHANC", peer_ip="127.0.0.1", peer_port=1)
        time.sleep(0.2)  # a few failed connection attempts
        assert sender.sent == 0
        with SyslogListener(port) as listener:
            assert len(listener.wait_for(2)) == 2
            listener.drop_connections()  # the receiver restarts: the held connection is gone
            time.sleep(0.1)
            log.append("association-accepted", calling_ae="ORTHANC", peer_ip="127.0.0.1", peer_port=2)
            assert len(listener.wait_for(3)) == 3
            assert listener.connections >= 2 and not listener.errors
    finally:
        sender.close(1)
        log.close()


def test_an_unreachable_receiver_costs_the_caller_nothing(tmp_path, caplog):
    port = free_port()  # nothing listens there
    sender = make_forwarder(port, queue_size=3)
    log = AuditLog(tmp_path / "audit.jsonl", node_ae="AINODE", forward=sender)
    with caplog.at_level(logging.WARNING, logger="ainode"):
        t0 = time.perf_counter()
        for i in range(50):
            log.append("instance-stored", calling_ae="ORTHANC", peer_ip="127.0.0.1", patient_id=PATIENT,
                       study_uid=f"{STUDY}.{i}", sop_instance_uid=f"{STUDY}.{i}.1", sop_class_uid=CT)
        appended_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sender.close(0.3)
        close_s = time.perf_counter() - t0
        log.close()
    assert appended_s < 1.0 and close_s < 2.5
    assert len(file_records(tmp_path / "audit.jsonl")) == 50 and verify_log(tmp_path / "audit.jsonl").ok
    assert sender.sent == 0 and sender.dropped == 50
    assert f"127.0.0.1:{port}" in caplog.text and "dropped" in caplog.text
    assert PATIENT not in caplog.text and STUDY not in caplog.text


def test_close_delivers_what_is_queued(tmp_path):
    with SyslogListener() as listener:
        sender = make_forwarder(listener.port)
        for i in range(200):
            sender.submit({"event": "job-start", "outcome": "success", "ts": "2026-01-01T00:00:00+00:00",
                           "node": "AINODE", "study_uid": STUDY, "patient_id": PATIENT, "job_id": i})
        sender.close(5)
        assert len(listener.wait_for(200, 2)) == 200
    assert sender.dropped == 0 and not listener.errors


def test_unmapped_events_take_no_queue_slot():
    sender = make_forwarder(free_port())
    try:
        forwarder = AtnaForwarder(AtnaMapper(audit_source_id="A"), sender)
        for event in sorted(NOT_FORWARDED) + ["something-new"]:
            forwarder({"event": event, "outcome": "success", "ts": "2026-01-01T00:00:00+00:00"})
        assert sender.flush(0.1)
    finally:
        sender.close(0.1)


def test_rfc5424_header_and_octet_counting():
    body = "<AuditMessage>é</AuditMessage>".encode()
    raw = rfc5424(body, app_name="ainode", hostname="host name", procid=42)
    msg = parse_rfc5424(raw)
    assert (msg.pri, msg.hostname, msg.procid, msg.msgid, msg.structured_data) == (85, "host_name", "42",
                                                                                   "IHE+RFC-3881", "-")
    assert msg.msg == b"\xef\xbb\xbf" + body and msg.timestamp.endswith("Z")
    buf = bytearray(octet_frame(raw) + octet_frame(b"<85>1 - - - - - - x")[:5])
    assert split_frames(buf) == [raw] and bytes(buf) == octet_frame(b"<85>1 - - - - - - x")[:5]
    assert parse_rfc5424(rfc5424(body, app_name="a", hostname="h", procid=1, bom=False)).msg == body


# ---- config ------------------------------------------------------------------------------------------

def test_section_rules():
    s = AtnaSection(host="arr.hospital.local")
    assert (s.transport, s.resolved_port, s.app_name, s.source_id("AINODE")) == ("tls", 6514, "ainode", "AINODE")
    assert AtnaSection(host="h", audit_source_id="NODE-7").source_id("AINODE") == "NODE-7"
    assert s.model_config["extra"] == Strict.model_config["extra"] == "forbid"
    assert s.model_config["frozen"] and Strict.model_config["frozen"]
    for bad, words in [
        ({"host": "h", "transport": "tcp"}, "needs port"),
        ({"host": "h", "transport": "tcp", "port": 514, "ca_file": "ca.pem"}, "transport is tcp"),
        ({"host": "h", "cert_file": "c.pem"}, "go together"),
        ({"host": "h", "app_name": "ai node"}, "printable ASCII"),
        ({"host": "h", "portt": 1}, "Extra inputs"),
        ({"host": "h", "port": 70000}, "less than or equal"),
        ({}, "host"),
    ]:
        with pytest.raises(ValidationError, match=words):
            AtnaSection(**bad)
    with pytest.raises(ValidationError):
        s.host = "other"  # frozen


def test_build_names_the_unusable_file(tmp_path):
    assert build_atna_forwarder(AtnaSection(host="h", enabled=False), node_ae="A") is None
    with pytest.raises(AtnaConfigError, match=r"atna\.ca_file: file not found: .*missing\.pem"):
        build_atna_forwarder(AtnaSection(host="h", ca_file=Path("missing.pem")), node_ae="A", base=tmp_path)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(AtnaConfigError, match=r"atna\.ca_file: .*junk\.pem holds no PEM certificate"):
        build_atna_forwarder(AtnaSection(host="h", ca_file=tmp_path / "junk.pem"), node_ae="A")


# ---- a throwaway PKI made with the openssl CLI --------------------------------------------------------

def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


class Pki:
    def __init__(self, d: Path) -> None:
        self.dir = d
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"), "-days", "2", "-subj", "/CN=ainode-test-ca",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        for name, cn, ext in [("server", "localhost", "serverAuth"), ("client", "ainode-client", "clientAuth")]:
            (d / f"{name}.ext").write_text(
                f"subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
                f"keyUsage=critical,digitalSignature\nextendedKeyUsage={ext}\n")
            _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                     "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.csr"), "-subj", f"/CN={cn}")
            _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                     "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "2", "-extfile", str(d / f"{name}.ext"))

    def server_context(self, require_client_cert: bool = False):  # type: ignore[no-untyped-def]
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.dir / "server.pem"), str(self.dir / "server.key"))
        if require_client_cert:
            ctx.load_verify_locations(cafile=str(self.dir / "ca.pem"))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"))
