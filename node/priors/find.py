"""C-FIND for a patient's earlier studies (study level) and their image series (series level).

The PACS's matching is not trusted: every answer is checked here again (exact PatientID, date range,
modality, not the current study), since a PACS may match case-insensitively or ignore a range.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta

from pydicom.dataset import Dataset
from pynetdicom.association import Association

from node.assemble.find import QueryError, _find
from node.config.schema import Source
from node.priors.association import PriorError
from node.priors.config import PriorsSpec
from node.receive.spool import BadUID, check_uid

# Series that are not images a plugin can read as a volume (results, reports, presentation states, ...).
NON_IMAGE_MODALITIES = {"SR", "SEG", "PR", "KO", "DOC", "REG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RWV", "OT"}


@dataclass(frozen=True)
class CurrentStudy:
    """What the job's own study says about itself (from its first instance's header)."""

    study_uid: str
    patient_id: str
    study_date: str  # YYYYMMDD, or "" when the header has none
    study_time: str
    modality: str


@dataclass(frozen=True)
class PriorStudy:
    study_uid: str
    study_date: str
    study_time: str


@dataclass(frozen=True)
class PriorSeries:
    series_uid: str
    modality: str
    instances: int | None  # NumberOfSeriesRelatedInstances, when the PACS says


def _day(text: str) -> date | None:
    try:
        return datetime.strptime(text.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _answers(assoc: Association, src: Source, query: Dataset) -> list[Dataset]:
    try:
        return list(_find(assoc, src, query))
    except QueryError as exc:
        raise PriorError(str(exc)) from exc


def find_prior_studies(assoc: Association, src: Source, current: CurrentStudy, spec: PriorsSpec,
                       today: date | None = None) -> list[PriorStudy]:
    """The patient's studies before `current`, newest first, within `spec.max_age_days` of it."""
    ref = _day(current.study_date) or today or date.today()
    oldest = ref - timedelta(days=spec.max_age_days) if spec.max_age_days else None
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.PatientID = current.patient_id
    q.StudyInstanceUID = ""
    q.StudyDate = f"{oldest.strftime('%Y%m%d') if oldest else ''}-{ref.strftime('%Y%m%d')}"
    q.StudyTime = ""
    q.ModalitiesInStudy = current.modality if spec.same_modality else ""
    found: dict[str, PriorStudy] = {}
    for a in _answers(assoc, src, q):
        try:
            uid = check_uid(a.get("StudyInstanceUID"), "StudyInstanceUID")
        except BadUID:
            continue
        day = _day(str(a.get("StudyDate") or ""))
        when = (str(a.get("StudyDate") or ""), str(a.get("StudyTime") or ""))
        listed = a.get("ModalitiesInStudy") or []
        modalities = {str(m).upper() for m in ([listed] if isinstance(listed, str) else listed)}
        if (uid == current.study_uid or str(a.get("PatientID") or "") != current.patient_id
                or day is None or day > ref or (oldest and day < oldest)
                or (day == _day(current.study_date) and current.study_time and when[1] >= current.study_time)
                or (spec.same_modality and modalities and current.modality.upper() not in modalities)):
            continue
        found[uid] = PriorStudy(uid, *when)
    return sorted(found.values(), key=lambda p: (p.study_date, p.study_time), reverse=True)


def find_image_series(assoc: Association, src: Source, study_uid: str, modality: str | None) -> list[PriorSeries]:
    """The study's series of `modality` (None: every image series)."""
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.Modality = ""
    q.NumberOfSeriesRelatedInstances = ""
    out = []
    for a in _answers(assoc, src, q):
        if str(a.get("StudyInstanceUID") or study_uid) != study_uid:
            continue
        try:
            uid = check_uid(a.get("SeriesInstanceUID"), "SeriesInstanceUID")
        except BadUID:
            continue
        mod = str(a.get("Modality") or "").upper()
        if (mod != modality.upper()) if modality else (mod in NON_IMAGE_MODALITIES):
            continue
        try:
            count: int | None = int(a.get("NumberOfSeriesRelatedInstances"))
        except (TypeError, ValueError):
            count = None
        out.append(PriorSeries(uid, mod, count))
    return out
