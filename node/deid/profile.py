"""PS3.15 Basic Application Level Confidentiality Profile, keyed, for copies sent to external destinations.

Applied to every element at every depth (sequence items included):
- Table E.1-1's action (node.deid.table, from the dicom-anonymizer package). Compound actions take the
  first choice that keeps a Type 2 attribute present: X/Z, X/Z/D and Z/D → Z (empty); X/D → X; X/Z/U*
  keeps the sequence and cleans its items. Sequences under X/Z or X/Z/D are removed (mostly Type 3,
  where an empty sequence is invalid); Acquisition Context Sequence (Type 2) is emptied. Attributes
  the table does not list are kept (and their sequences cleaned).
- UIDs (action U, and any UID element that repeats one of them): keyed `2.25.` UIDs, the same for
  the same input, so a series stays one series. Retain UIDs Option: kept.
- PatientID, PatientName, AccessionNumber: keyed pseudonyms (Z and Z/D allow a dummy value); these,
  every new UID and the study's patient/study attributes are recorded in the PseudonymMap, committed
  before deidentify() returns, so a returning result can always be put back.
- Dates: Retain Full Dates Option keeps them; Modified Dates Option (the default) moves every DA/DT
  back by a keyed per-patient number of days (times unchanged, intervals kept); with neither, the
  table's action applies. PatientBirthDate is always emptied and PatientBirthTime removed.
- Private tags: removed at every depth, except the configured safe ones (Retain Safe Private Option).
- Burned-in annotation: refused (BurnedInAnnotation YES, or absent on a kind of image that often
  has it): pixel data is not cleaned.
- A final check refuses the copy if any original patient ID, name, birth date, accession number or
  instance UID is still found in any element, nested or private, even as part of a longer string.
"""

from __future__ import annotations

import copy
from datetime import datetime, timedelta

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from node.deid import table
from node.deid.config import MIN_KEY_BYTES, DeidKeyError, DeidSettings
from node.deid.errors import DeidentificationError
from node.deid.keyed import date_shift_days, key_id, keyed_token, keyed_uid
from node.deid.leaks import DATE_VRS, check_no_leak, identity_values
from node.deid.pixels import check_burned_in
from node.deid.pseudonyms import ATTR, Pair, PseudonymMap
from node.deid.reidentify import reidentify
from node.deid.walk import values as _strings
from node.deid.walk import walk

# Patient and study attributes restored in a returning result (besides ID, name and accession number).
STUDY_CONTEXT = ("IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientSize",
                 "PatientWeight", "StudyDate", "StudyTime", "StudyID", "ReferringPhysicianName", "StudyDescription")
METHOD = "AINODE PS3.15 E.1 Basic Profile, keyed pseudonyms"
TYPE2_SEQUENCES = frozenset({Tag("AcquisitionContextSequence")})  # kept empty rather than removed
BINARY_VRS = ("OB", "OW", "OF", "OD", "OL", "OV", "UN")
NUMERIC_VRS = ("US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT")
DUMMY = {"PN": "ANONYMIZED", "DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000Y",
         "DS": "0", "IS": "0", "UR": "http://anonymized.invalid"}

_PATIENT_ID, _PATIENT_NAME = Tag("PatientID"), Tag("PatientName")
_ACCESSION, _BIRTH_DATE, _BIRTH_TIME = Tag("AccessionNumber"), Tag("PatientBirthDate"), Tag("PatientBirthTime")


class Deidentifier:
    """De-identifies copies for external destinations and re-identifies what comes back."""

    def __init__(self, settings: DeidSettings, key: bytes, pseudonyms: PseudonymMap) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise DeidKeyError(f"the pseudonym key has {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
        self.settings = settings
        self._key = key
        self.key_id = key_id(key)
        self.pseudonyms = pseudonyms
        self._safe = {(s.creator, s.group, s.element) for s in settings.safe_private}

    def deidentify(self, ds: Dataset) -> Dataset:
        """A de-identified copy of `ds` (which is not changed); its pairs are durable when this returns.

        Raises DeidentificationError (BurnedInAnnotationError for burned-in text) when the instance must
        not leave; the message names the attribute at fault.
        """
        check_burned_in(ds)
        if not str(ds.get("StudyInstanceUID", "") or ""):
            raise DeidentificationError("(0020,000D) StudyInstanceUID is missing: a result could not be put back "
                                        "into its study, so the instance is not sent")
        run = _Run(self, ds)
        out = run.apply()
        check_no_leak(out, identity_values(ds, set() if self.settings.retain_uids else run.instance_uids,
                                           dates_handled=self.settings.retain_dates or self.settings.shift_dates))
        self.pseudonyms.record(run.pairs, self.key_id)
        return out

    def reidentify(self, ds: Dataset) -> Dataset | None:
        """The returning object with the original UIDs, patient and study; None if its study is not ours."""
        return reidentify(ds, self.pseudonyms)

    def methods(self) -> list[tuple[str, str]]:
        """(code value, meaning) of the profile and options applied (DeidentificationMethodCodeSequence)."""
        return applied_methods(self.settings)


def applied_methods(s: DeidSettings) -> list[tuple[str, str]]:
    """CID 7050 codes (scheme DCM) of the Basic Profile and of each option these settings apply."""
    applied = [("113100", "Basic Application Confidentiality Profile")]
    if s.retain_uids:
        applied.append(("113110", "Retain UIDs Option"))
    if s.retain_dates:
        applied.append(("113106", "Retain Longitudinal Temporal Information Full Dates Option"))
    elif s.shift_dates:
        applied.append(("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
    if s.retain_patient_characteristics:
        applied.append(("113108", "Retain Patient Characteristics Option"))
    if s.remove_private_tags and s.safe_private:
        applied.append(("113111", "Retain Safe Private Option"))
    return applied


class _Run:
    """One instance's de-identification: the copy, and the pairs it made."""

    def __init__(self, d: Deidentifier, src: Dataset) -> None:
        self.s, self.key, self.safe, self.src = d.settings, d._key, d._safe, src
        self.study = str(src.StudyInstanceUID)
        self.pid = str(src.get("PatientID", "") or "")
        self.name = str(src.get("PatientName", "") or "")
        self.pseudo_pid = self._make_pid(self.pid)
        self.shift = date_shift_days(self.key, self.pid or f"study:{self.study}", self.s.max_date_shift_days)
        self.uid_tags = table.uid_tags()
        self.instance_uids = {v for _, _, e in walk(src) if e.VR == "UI" and not e.tag.is_private
                              and e.tag in self.uid_tags for v in _strings(e) if v}
        self.pairs: list[Pair] = []

    # ---- the pass ------------------------------------------------------

    def apply(self) -> Dataset:
        out = copy.deepcopy(self.src)
        self._clean(out)
        self._mark(out)
        self._file_meta(out)
        for kw in STUDY_CONTEXT:
            if kw in self.src:
                self._pair(f"{ATTR}{kw}", _text(self.src[kw]), _text(out[kw]) if kw in out else "")
        return out

    def _clean(self, ds: Dataset) -> None:
        if self.s.remove_private_tags:
            self._remove_private(ds)
        for tag in list(ds.keys()):
            if tag not in ds:
                continue
            elem = ds[tag]
            if tag.is_private:  # kept: a safe one, or remove_private_tags is off; clean what it nests
                if elem.VR == "SQ":
                    self._clean_items(elem)
                elif elem.VR == "UI" and any(v in self.instance_uids for v in _strings(elem)):
                    self._uids(elem)
                continue
            self._element(ds, elem)

    def _clean_items(self, elem: DataElement) -> None:
        for item in elem.value or ():
            self._clean(item)

    def _element(self, ds: Dataset, elem: DataElement) -> None:
        tag, vr, s = elem.tag, elem.VR, self.s
        if tag == _PATIENT_ID:
            elem.value = self._patient_id(str(elem.value or ""))
            return
        if tag == _PATIENT_NAME:
            elem.value = self._patient_name(str(elem.value or ""))
            return
        if tag == _ACCESSION:
            elem.value = self._accession(str(elem.value or ""))
            return
        if tag == _BIRTH_DATE:
            elem.value = None
            return
        if tag == _BIRTH_TIME:
            del ds[tag]
            return
        if s.retain_patient_characteristics and tag in table.PATIENT_CHARACTERISTICS:
            return
        if vr in DATE_VRS and (s.retain_dates or s.shift_dates):
            if not s.retain_dates and vr != "TM":
                self._shift(elem)
            return
        if vr == "UI" and (tag in self.uid_tags or any(v in self.instance_uids for v in _strings(elem))):
            self._uids(elem)
            return
        action = table.action_for(tag)
        A = table.Action
        if action is None or action is A.X_Z_U:
            if vr == "SQ":
                self._clean_items(elem)
            return
        if action in (A.X, A.X_D):
            del ds[tag]
        elif vr == "SQ" and action is not A.Z and tag not in TYPE2_SEQUENCES:
            del ds[tag]  # X/Z, X/Z/D: an empty sequence is invalid where it is Type 3, as most of these are
        elif action in (A.Z, A.X_Z, A.X_Z_D, A.Z_D):
            elem.value = [] if vr == "SQ" else None
        elif action is A.U or vr == "UI":
            self._uids(elem)
        else:  # D
            self._dummy(elem)

    def _dummy(self, elem: DataElement) -> None:
        vr = elem.VR
        if vr == "SQ":
            self._clean_items(elem)
        elif vr in DUMMY:
            elem.value = DUMMY[vr]
        elif vr in NUMERIC_VRS:
            elem.value = 0
        elif vr in BINARY_VRS:
            elem.value = b"\x00\x00"
        else:  # AE CS LO LT SH ST UC UT
            elem.value = "ANONYMIZED"

    def _remove_private(self, ds: Dataset) -> None:
        """Remove private elements except safe ones, and the creators of blocks left empty."""
        kept_blocks = set()
        for tag in [t for t in ds.keys() if t.is_private]:
            if tag.element >= 0x1000:
                creator = ds.get(Tag(tag.group, tag.element >> 8))
                name = str(creator.value).strip() if creator is not None and creator.value else None
                if name is not None and (name, tag.group, tag.element & 0xFF) in self.safe:
                    kept_blocks.add((tag.group, tag.element >> 8))
                    continue
                del ds[tag]
        for tag in [t for t in ds.keys() if t.is_private]:
            if tag.element < 0x1000 and (tag.group, tag.element) not in kept_blocks:
                del ds[tag]

    # ---- values --------------------------------------------------------

    def _pair(self, kind: str, original: str, pseudonym: str) -> None:
        self.pairs.append(Pair(kind, original, pseudonym, self.study))

    def _make_pid(self, pid: str) -> str:
        # No patient ID: one pseudonym per study rather than one shared by every ID-less patient.
        return self.s.patient_id_prefix + keyed_token(self.key, "patient_id", pid or f"study:{self.study}", 16)

    def _patient_id(self, pid: str) -> str:
        pseudo = self.pseudo_pid if pid == self.pid else self._make_pid(pid)
        self._pair("patient_id", pid, pseudo)
        return pseudo

    def _patient_name(self, name: str) -> str:
        # The patient's name becomes the patient's pseudonymous ID: one token per patient, nothing to guess.
        # The trailing caret makes it an explicit family-name-only person name (viewers and highdicom expect
        # name components).
        pseudo = (self.pseudo_pid if name == self.name else (
            self.s.patient_id_prefix + keyed_token(self.key, "patient_name", name, 16))) + "^"
        self._pair("patient_name", name, pseudo)
        return pseudo

    def _accession(self, accession: str) -> str | None:
        if not accession:
            return None
        pseudo = keyed_token(self.key, "accession", accession, 16)  # SH: at most 16 characters
        self._pair("accession", accession, pseudo)
        return pseudo

    def _uids(self, elem: DataElement) -> None:
        old = _strings(elem)
        new = [(v if self.s.retain_uids else keyed_uid(self.key, v)) if v else v for v in old]
        for o, n in zip(old, new):
            if o:
                self._pair("uid", o, n)
        elem.value = new if isinstance(elem.value, (list, MultiValue)) else (new[0] if new else None)

    def _shift(self, elem: DataElement) -> None:
        new = [_shift_date(v, self.shift) for v in _strings(elem)]
        elem.value = new if isinstance(elem.value, (list, MultiValue)) else (new[0] if new else None)

    def _mark(self, out: Dataset) -> None:
        s = self.s
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = METHOD
        items = []
        for value, meaning in applied_methods(s):
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            items.append(item)
        out.DeidentificationMethodCodeSequence = items
        out.LongitudinalTemporalInformationModified = (
            "UNMODIFIED" if s.retain_dates else "MODIFIED" if s.shift_dates else "REMOVED")

    def _file_meta(self, out: Dataset) -> None:
        """A new file meta: only what describes the encoding, and the new SOP Instance UID."""
        old = getattr(out, "file_meta", None)
        if old is None:
            return
        meta = FileMetaDataset()
        for kw in ("FileMetaInformationVersion", "MediaStorageSOPClassUID", "TransferSyntaxUID",
                   "ImplementationClassUID", "ImplementationVersionName"):
            if kw in old:
                meta[kw] = old[kw]
        if "SOPInstanceUID" in out:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        out.file_meta = meta


def _text(elem: DataElement) -> str:
    return "\\".join(_strings(elem))


def _shift_date(value: str, days: int) -> str:
    """YYYYMMDD[...] moved back `days` days; anything unparseable is dropped rather than sent as is."""
    v = value.strip()
    if len(v) < 8 or not v[:8].isdigit():
        return ""
    try:
        d = datetime.strptime(v[:8], "%Y%m%d").date() - timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return f"{d.year:04d}{d.month:02d}{d.day:02d}{v[8:]}"

