"""Put an object returning from an external service (its SR, its SEG...) back into the original study.

Recognised by its Study Instance UID being a pseudonym the node made; then every UID the map knows
(at any depth: evidence and referenced-series sequences, SR content) becomes the original again, the
objects' own new UIDs stay, and the patient and study attributes are restored from the map.
Needs only the map, not the key, so results still come home after a key change.
"""

from __future__ import annotations

import copy

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from node.deid.pseudonyms import KIND_KEYWORDS, PseudonymMap
from node.deid.walk import values, walk

# Set from the map even if the returning object lacks them (Patient and General Study modules).
ALWAYS_RESTORED = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                   "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDescription")
# A re-identified object is no longer de-identified.
DEID_MARKS = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
              "LongitudinalTemporalInformationModified")
_KEYWORD_KINDS = {kw: kind for kind, kw in KIND_KEYWORDS.items()}


def reidentify(ds: Dataset, pseudonyms: PseudonymMap) -> Dataset | None:
    """A re-identified copy of `ds`, or None if its StudyInstanceUID is not a pseudonym of this node."""
    study = str(ds.get("StudyInstanceUID", "") or "")
    original_study = pseudonyms.original_study(study) if study else None
    if original_study is None:
        return None
    out = copy.deepcopy(ds)
    elements = [(elem, holder) for _, holder, elem in walk(out) if not elem.tag.is_private]
    uids = pseudonyms.originals("uid", {v for e, _ in elements if e.VR == "UI" for v in values(e)})
    ids = {kind: pseudonyms.originals(kind, {v for e, _ in elements if e.keyword == kw for v in values(e)})
           for kw, kind in _KEYWORD_KINDS.items()}
    for elem, _ in elements:
        mapping = uids if elem.VR == "UI" else ids.get(_KEYWORD_KINDS.get(elem.keyword, ""))
        if not mapping:
            continue
        old = values(elem)
        new = [mapping.get(v, v) for v in old]
        if new != old:
            elem.value = new if isinstance(elem.value, (list, MultiValue)) else new[0]
    context = pseudonyms.study_context(original_study)
    for keyword, value in context.items():
        if keyword in ALWAYS_RESTORED or keyword in out:
            setattr(out, keyword, value or None)
    out.StudyInstanceUID = original_study
    for keyword in DEID_MARKS:
        if keyword in out:
            delattr(out, keyword)
    meta = getattr(out, "file_meta", None)
    if meta is not None and "SOPInstanceUID" in out:
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out
