"""Reads back a TID 1500 measurement report that the node built, as plain data for HL7 and FHIR.

The RIS message is made from the SR file, not from the plugin's result, so what the RIS gets is exactly
what the PACS got: the same values, codes, UIDs and patient/accession attributes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.plugin_api import Code

from .errors import RisSendError

MEASUREMENT_REPORT = ("126000", "DCM")
MEASUREMENT_GROUP = ("125007", "DCM")
PROCEDURE_REPORTED = ("121058", "DCM")
TRACKING_ID = ("112039", "DCM")
TRACKING_UID = ("112040", "DCM")
FINDING = ("121071", "DCM")
FINDING_SITES = {("363698007", "SCT"), ("G-C0E3", "SRT")}
CERTAINTY = ("111012", "DCM")
ALGORITHM_NAME = ("111001", "DCM")
ALGORITHM_VERSION = ("111003", "DCM")
ALGORITHM_PARAMETERS = ("111002", "DCM")
NOT_FOR_CLINICAL_USE = re.compile(r"not\s+for\s+clinical\s+use", re.IGNORECASE)


@dataclass(frozen=True)
class Num:
    concept: Code
    value: Decimal  # exactly the SR's DS string, so HL7/FHIR carry the same digits as the PACS object
    unit: Code


@dataclass(frozen=True)
class Group:
    """One TID 1500 measurement group: one finding of the plugin."""

    tracking_id: str | None
    tracking_uid: str | None
    finding: Code | None
    finding_site: Code | None
    measurements: tuple[Num, ...]
    confidence: Num | None  # DCM 111012 "Certainty of Finding", in %


@dataclass(frozen=True)
class Algorithm:
    name: str
    version: str
    parameters: tuple[str, ...] = ()  # "key=value", e.g. model_name=..., model_version=..., weights_sha256=...

    def parameter(self, key: str) -> str | None:
        for p in self.parameters:
            k, sep, v = p.partition("=")
            if sep and k.strip() == key:
                return v.strip()
        return None

    def describe(self) -> str:
        text = f"{self.name} {self.version}".strip()
        model, model_version = self.parameter("model_name"), self.parameter("model_version")
        if model or model_version:
            text += f", model {model or '?'} {model_version or ''}".rstrip()
        sha = self.parameter("weights_sha256")
        if sha:
            text += f" (weights sha256 {sha[:12]})"
        return text


@dataclass(frozen=True)
class Report:
    path: Path
    patient_id: str
    issuer_of_patient_id: str
    patient_name: str  # DICOM PN, e.g. "Family^Given^Middle^Prefix^Suffix"
    birth_date: str  # DICOM DA or ""
    sex: str  # DICOM M/F/O or ""
    accession: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    procedure: Code | None
    study_datetime: str  # YYYYMMDDHHMMSS[.ffff] from StudyDate/StudyTime, or ""
    content_datetime: str  # from ContentDate/ContentTime, or ""
    tz_offset: str  # TimezoneOffsetFromUTC (0008,0201), e.g. "+0100", or ""
    preliminary: bool  # unverified or marked preliminary: results go out as "P", not "F"
    not_for_clinical_use: bool
    algorithms: tuple[Algorithm, ...]
    groups: tuple[Group, ...] = field(default=())

    def redact(self, text: str) -> str:
        """`text` without this patient's ID or name parts, for error messages that end up in logs: a RIS or
        FHIR server may quote them back (e.g. "unknown patient PID42")."""
        words = {self.patient_id, *re.split(r"[\^=\s]+", self.patient_name)}
        for w in sorted((w for w in words if len(w) >= 3), key=len, reverse=True):
            text = text.replace(w, "<patient>")
        return text


@contextmanager
def patient_data_redacted(report: Report) -> Iterator[None]:
    """Re-raise a RisSendError with the patient's identifiers taken out of its message."""
    try:
        yield
    except RisSendError as exc:
        raise RisSendError(report.redact(str(exc)), retryable=exc.retryable) from exc.__cause__


def _key(item: Dataset) -> tuple[str, str]:
    seq = item.get("ConceptNameCodeSequence")
    if not seq:
        return ("", "")
    return (_code_value(seq[0]), str(seq[0].get("CodingSchemeDesignator", "")))


def _code_value(c: Dataset) -> str:
    return str(c.get("CodeValue") or c.get("LongCodeValue") or c.get("URNCodeValue") or "")


def _code(c: Dataset) -> Code:
    return Code(_code_value(c), str(c.get("CodingSchemeDesignator", "")), str(c.get("CodeMeaning", "")))


def _concept_code(item: Dataset) -> Code | None:
    seq = item.get("ConceptCodeSequence")
    return _code(seq[0]) if seq else None


def _dt(date: object, time: object) -> str:
    d = re.sub(r"\D", "", str(date or ""))
    if len(d) != 8:
        return ""
    t = str(time or "").strip()
    m = re.match(r"^(\d{2,6})(\.\d{1,4})?", t)
    return d + (m.group(1) + (m.group(2) or "") if m else "")


def _walk(items: object):  # type: ignore[no-untyped-def]
    for item in items or []:  # type: ignore[union-attr]
        yield item
        yield from _walk(item.get("ContentSequence"))


def _algorithm(items: object) -> Algorithm | None:
    name = version = None
    params: list[str] = []
    for item in items or []:  # type: ignore[union-attr]
        key = _key(item)
        if key == ALGORITHM_NAME:
            name = str(item.get("TextValue", ""))
        elif key == ALGORITHM_VERSION:
            version = str(item.get("TextValue", ""))
        elif key == ALGORITHM_PARAMETERS:
            params.append(str(item.get("TextValue", "")))
    return Algorithm(name, version or "", tuple(params)) if name else None


def _num(item: Dataset, path: Path) -> Num | None:
    mv = item.get("MeasuredValueSequence")
    if not mv:
        return None  # a NUM with a qualifier instead of a value (e.g. "measurement failure")
    try:
        value = Decimal(str(mv[0].NumericValue).strip())
    except (InvalidOperation, AttributeError) as exc:
        raise RisSendError(f"{path}: NUM '{item.ConceptNameCodeSequence[0].CodeMeaning}' has no numeric value "
                           f"(0040,A30A)", retryable=False) from exc
    unit = _code(mv[0].MeasurementUnitsCodeSequence[0])
    return Num(_code(item.ConceptNameCodeSequence[0]), value, unit)


def _group(container: Dataset, path: Path) -> tuple[Group, list[Algorithm]]:
    tracking_id = tracking_uid = None
    finding = site = confidence = None
    nums: list[Num] = []
    algorithms = [a for a in [_algorithm(container.get("ContentSequence"))] if a]
    for item in container.get("ContentSequence", []):
        key, vt = _key(item), item.get("ValueType")
        if key == TRACKING_ID:
            tracking_id = str(item.get("TextValue", ""))
        elif key == TRACKING_UID:
            tracking_uid = str(item.get("UID", ""))
        elif key == FINDING:
            finding = _concept_code(item)
        elif key in FINDING_SITES:
            site = _concept_code(item)
        elif vt == "NUM":
            num = _num(item, path)
            algo = _algorithm(item.get("ContentSequence"))
            if algo:
                algorithms.append(algo)
            if num is None:
                continue
            if key == CERTAINTY:
                confidence = num
            else:
                nums.append(num)
    return Group(tracking_id, tracking_uid, finding, site, tuple(nums), confidence), algorithms


def _says_not_for_clinical_use(ds: Dataset, algorithms: list[Algorithm]) -> bool:
    for a in algorithms:
        flag = a.parameter("not_for_clinical_use")
        if flag is not None and flag.lower() in {"1", "true", "yes"}:
            return True
    texts = [str(ds.get("SeriesDescription", "")), str(ds.get("ImageComments", ""))]
    texts += [str(i.get("TextValue", "")) for i in _walk(ds.get("ContentSequence")) if i.get("ValueType") == "TEXT"]
    texts += [p for a in algorithms for p in a.parameters]
    return any(NOT_FOR_CLINICAL_USE.search(t) for t in texts)


def read_report(path: Path) -> Report:
    """The SR at `path` as a Report. Raises RisSendError (not retryable) if it is not a TID 1500 report."""
    path = Path(path)
    try:
        ds = dcmread(path)
    except FileNotFoundError as exc:
        raise RisSendError(f"result SR {path} does not exist (purged, or the path in the dispatch row is stale)",
                           retryable=False) from exc
    except (InvalidDicomError, OSError) as exc:
        raise RisSendError(f"result SR {path} cannot be read as DICOM: {exc}", retryable=False) from exc
    if _key(ds) != MEASUREMENT_REPORT:
        raise RisSendError(f"{path} is not a TID 1500 Imaging Measurement Report (Concept Name (0040,A043) is "
                           f"{_key(ds)})", retryable=False)
    accession = str(ds.get("AccessionNumber", "") or "").strip()
    if not accession:
        raise RisSendError(f"{path} has no Accession Number (0008,0050): the RIS could not match the result to "
                           f"an order. Check that the modality/PACS fills it in the study", retryable=False)
    groups, algorithms = [], []
    for item in _walk(ds.get("ContentSequence")):
        if item.get("ValueType") == "CONTAINER" and _key(item) == MEASUREMENT_GROUP:
            g, algos = _group(item, path)
            groups.append(g)
            algorithms += algos
    procedure = next((_concept_code(i) for i in ds.get("ContentSequence", []) if _key(i) == PROCEDURE_REPORTED), None)
    unique = tuple(dict.fromkeys(algorithms))
    tz = str(ds.get("TimezoneOffsetFromUTC", "") or "")
    return Report(
        path=path,
        patient_id=str(ds.get("PatientID", "") or ""),
        issuer_of_patient_id=str(ds.get("IssuerOfPatientID", "") or ""),
        patient_name=str(ds.get("PatientName", "") or ""),
        birth_date=re.sub(r"\D", "", str(ds.get("PatientBirthDate", "") or ""))[:8],
        sex=str(ds.get("PatientSex", "") or "").upper(),
        accession=accession,
        study_uid=str(ds.StudyInstanceUID),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        procedure=procedure,
        study_datetime=_dt(ds.get("StudyDate"), ds.get("StudyTime")),
        content_datetime=_dt(ds.get("ContentDate"), ds.get("ContentTime")),
        tz_offset=tz if re.fullmatch(r"[+-]\d{4}", tz) else "",
        preliminary=(str(ds.get("VerificationFlag", "")) != "VERIFIED"
                     or str(ds.get("PreliminaryFlag", "")) == "PRELIMINARY"),
        not_for_clinical_use=_says_not_for_clinical_use(ds, list(unique)),
        algorithms=unique,
        groups=tuple(groups),
    )
