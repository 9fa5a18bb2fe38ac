"""FHIR R4 transaction Bundle (one DiagnosticReport + one Observation per measurement) from a result SR.

Codes are the SR's own (SNOMED CT, LOINC, DICOM, UCUM) under their FHIR system URIs. The patient is
referenced by identifier (the SR's PatientID), not by a Patient resource id, because the node does not
know the FHIR server's ids; a server that cannot resolve identifiers answers 4xx (not retryable).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from node.plugin_api import Code

from .config import FhirDestination
from .errors import RisSendError
from .report import Num, Report, patient_data_redacted, read_report
from .tls import client_context

log = logging.getLogger(__name__)

SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "LN": "http://loinc.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "UCUM": "http://unitsofmeasure.org",
    "SRT": "http://snomed.info/srt",
}
RETRYABLE_STATUS = {408, 425, 429}
URI = "urn:ietf:rfc:3986"
DICOM_UID = "urn:dicom:uid"
IMAGING = {"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging",
           "display": "Imaging"}
RADIOLOGY = {"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD", "display": "Radiology"}
ACCESSION = {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}


def coding(code: Code) -> dict[str, str]:
    out = {"code": code.value, "display": code.meaning}
    system = SYSTEMS.get(code.scheme)
    if system:
        out["system"] = system
    return out


def _concept(code: Code) -> dict[str, Any]:
    return {"coding": [coding(code)], "text": code.meaning}


def _fhir_datetime(dicom_dt: str, tz_offset: str) -> str | None:
    """DICOM YYYYMMDD[HHMMSS] as a FHIR dateTime. FHIR wants a zone with a time: without the SR's
    TimezoneOffsetFromUTC the date alone is given rather than a guessed zone."""
    if len(dicom_dt) < 8:
        return None
    d = f"{dicom_dt[:4]}-{dicom_dt[4:6]}-{dicom_dt[6:8]}"
    t = dicom_dt[8:14]
    if len(t) < 6 or len(tz_offset) != 5:
        return d
    return f"{d}T{t[:2]}:{t[2:4]}:{t[4:6]}{tz_offset[:3]}:{tz_offset[3:]}"


def _quantity(num: Num) -> dict[str, Any]:
    q: dict[str, Any] = {"value": float(num.value), "unit": num.unit.meaning or num.unit.value, "code": num.unit.value}
    if num.unit.scheme in SYSTEMS:
        q["system"] = SYSTEMS[num.unit.scheme]
    return q


def build_bundle(report: Report, *, now: datetime | None = None) -> dict[str, Any]:
    """The transaction Bundle for `report`: Observations first, then the DiagnosticReport listing them."""
    now = now or datetime.now(timezone.utc)
    status = "preliminary" if report.preliminary else "final"
    subject = {"identifier": {"value": report.patient_id}}
    if report.issuer_of_patient_id:
        subject["identifier"]["assigner"] = {"display": report.issuer_of_patient_id}
    effective = _fhir_datetime(report.study_datetime, report.tz_offset)
    device = {"display": "; ".join(a.describe() for a in report.algorithms) or "AI algorithm"}
    notes = []
    if report.not_for_clinical_use:
        notes.append({"text": "NOT FOR CLINICAL USE"})
    entries, refs = [], []
    for i, g in enumerate(report.groups, start=1):
        for j, num in enumerate((*g.measurements, *([g.confidence] if g.confidence is not None else []))):
            # Derived from the SR's UID: a resend after a lost response is a conditional create of the same
            # identifiers, which the server skips instead of storing duplicates.
            full_url = f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, f'{report.sop_uid}/{i}/{j}')}"
            obs: dict[str, Any] = {
                "resourceType": "Observation",
                "identifier": [{"system": URI, "value": full_url}],
                "status": status,
                "category": [{"coding": [IMAGING]}],
                "code": _concept(num.concept),
                "subject": subject,
                "valueQuantity": _quantity(num),
                "device": device,
            }
            if effective:
                obs["effectiveDateTime"] = effective
            if g.finding_site:
                obs["bodySite"] = _concept(g.finding_site)
            finding = g.finding.meaning if g.finding else "finding"
            track = ", ".join(t for t in (g.tracking_id, g.tracking_uid and f"tracking UID {g.tracking_uid}") if t)
            obs["note"] = [{"text": f"{finding} {i}" + (f" ({track})" if track else "")}] + notes
            entries.append({"fullUrl": full_url, "resource": obs,
                            "request": {"method": "POST", "url": "Observation",
                                        "ifNoneExist": f"identifier={URI}|{full_url}"}})
            refs.append({"reference": full_url})
    dr: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "identifier": [
            {"type": {"coding": [ACCESSION]}, "value": report.accession},
            {"system": DICOM_UID, "value": f"urn:oid:{report.sop_uid}"},
        ],
        "status": status,
        "category": [{"coding": [RADIOLOGY]}],
        "code": _concept(report.procedure or Code("", "", "AI imaging measurements")),
        "subject": subject,
        "issued": now.isoformat(timespec="seconds"),
        "result": refs,
        "conclusion": f"AI result by {device['display']}" + (". NOT FOR CLINICAL USE" if report.not_for_clinical_use else ""),
    }
    if effective:
        dr["effectiveDateTime"] = effective
    sop = f"urn:oid:{report.sop_uid}"
    entries.append({"fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_OID, report.sop_uid)}", "resource": dr,
                    "request": {"method": "POST", "url": "DiagnosticReport",
                                "ifNoneExist": f"identifier={DICOM_UID}|{sop}"}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


def _token(dest: FhirDestination) -> str | None:
    if dest.token is not None:
        return dest.token.get_secret_value()
    if dest.token_file is not None:
        try:
            return dest.token_file.read_text().strip()
        except OSError as exc:
            raise RisSendError(f"FHIR token_file {dest.token_file} cannot be read ({exc.strerror})",
                               retryable=False) from exc
    if dest.token_env is not None:
        value = os.environ.get(dest.token_env)
        if not value:
            raise RisSendError(f"FHIR token_env {dest.token_env} is not set in the node's environment",
                               retryable=False)
        return value
    return None


def _outcome(body: bytes) -> str:
    """The diagnostics of an OperationOutcome, or the start of whatever the server said."""
    try:
        data = json.loads(body)
        issues = data.get("issue", []) if isinstance(data, dict) else []
        text = "; ".join(str(i.get("diagnostics") or i.get("details", {}).get("text") or i.get("code", ""))
                         for i in issues)
        if text:
            return text[:300]
    except (ValueError, AttributeError):
        pass
    return body[:300].decode("utf-8", errors="replace")


def _location(body: bytes) -> str:
    try:
        entries = json.loads(body).get("entry", [])
        return ", ".join(e["response"]["location"] for e in entries if e.get("response", {}).get("location"))
    except (ValueError, AttributeError, KeyError, TypeError):
        return ""


def _post(url: str, body: bytes, headers: dict[str, str], timeout_s: float,
          context: ssl.SSLContext | None) -> tuple[int, bytes]:
    """One POST; HTTP and network failures as RisSendError."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as response:
            status, answer = response.status, response.read()
    except urllib.error.HTTPError as exc:
        detail = _outcome(exc.read())
        retryable = exc.code >= 500 or exc.code in RETRYABLE_STATUS
        hint = " (check the token)" if exc.code in (401, 403) else ""
        raise RisSendError(f"FHIR server {url} answered HTTP {exc.code}{hint}: {detail}", retryable=retryable) from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            raise RisSendError(f"FHIR server {url}: its TLS certificate does not verify ({reason.verify_message}): "
                               f"check ca_file", retryable=False) from exc
        raise RisSendError(f"FHIR server {url} cannot be reached ({reason}): check base_url, network and that "
                           f"the server runs", retryable=True) from exc
    except (TimeoutError, OSError) as exc:
        raise RisSendError(f"FHIR server {url}: no answer within {timeout_s:g} s ({exc})",
                           retryable=True) from exc
    return status, answer


def send_fhir(dest: FhirDestination, sr_path: Path) -> str:
    """POST the SR at `sr_path` to `dest` as a transaction Bundle; one attempt. Returns a one-line summary.

    Raises RisSendError: retryable for timeouts, connection errors, 5xx, 408 and 429; not for other 4xx.
    """
    report = read_report(sr_path)
    bundle = build_bundle(report)
    body = json.dumps(bundle).encode("utf-8")
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    token = _token(dest)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    url = dest.base_url
    context: ssl.SSLContext | None = client_context(dest.ca_file) if url.startswith("https://") else None
    with patient_data_redacted(report):
        status, answer = _post(url, body, headers, dest.timeout_s, context)
    where = _location(answer)
    log.info("FHIR bundle to %s: HTTP %d, %d observations", url, status, len(bundle["entry"]) - 1)
    return f"HTTP {status}" + (f": {where}" if where else "")
