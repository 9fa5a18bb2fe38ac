"""What the store indexes from a received data set's header."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.receive.checks import CONVERT, drop_unreadable_metadata, identity, raw_text, tag_of
from node.store import InstanceMeta


def _float(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _text(ds: Dataset, keyword: str) -> str | None:
    if (plain := raw_text(ds, tag_of(keyword))) is not CONVERT:  # most values: no pydicom conversion
        return plain  # type: ignore[return-value]
    elem = ds.get(tag_of(keyword))  # by tag: a keyword lookup costs more than the value (once per instance)
    value = None if elem is None else elem.value
    if isinstance(value, MultiValue):  # several values (a sender's error for most): as DICOM writes them,
        value = "\\".join(str(v).strip() for v in value)  # not Python's "['A', 'B']"
    return str(value).strip() if value not in (None, "") else None


def instance_meta(ds: Dataset, *, path: str, size: int, transfer_syntax: str, calling_ae: str | None,
                  checked: tuple[str, str, str, str] | None = None) -> InstanceMeta:
    """Index entry for a stored instance. Raises checks.CannotUnderstand (naming the tag) for a missing,
    unsafe or wrongly encoded UID.

    `checked`: the (SOP instance, study, series, SOP class) UIDs from checks.identity when the caller has
    already run it and dropped unreadable metadata (the receiver does, before writing).
    """
    if checked is None:
        checked = identity(ds)
        drop_unreadable_metadata(ds)  # a descriptive attribute with a wrong VR is left out, not guessed
    sop_uid, study_uid, series_uid, sop_class = checked
    return InstanceMeta(
        sop_instance_uid=sop_uid, sop_class_uid=sop_class, series_uid=series_uid, study_uid=study_uid,
        transfer_syntax=transfer_syntax, path=path, size_bytes=size, calling_ae=calling_ae,
        patient_id=_text(ds, "PatientID"), accession_number=_text(ds, "AccessionNumber"),
        study_description=_text(ds, "StudyDescription"), modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"), series_description=_text(ds, "SeriesDescription"),
        slice_thickness=_float(_text(ds, "SliceThickness")),
    )
