"""TID 1500 measurement report (Comprehensive 3D SR) from a plugin's findings, with highdicom."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from node.plugin_api import Code, Finding

from .seg import coded

CT_OF_CHEST = Code("418023006", "SCT", "Computed tomography of chest")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging")
# A model's confidence in a finding. TID 1500 has no slot for it, so it is one more NUM in the finding's
# group: DCM 111012 "Certainty of Finding", the concept the CAD SR templates (TID 4000 family) use for how
# likely a detected finding is true, in UCUM "%" (0..100). "Probability of cancer" (DCM 111047) would
# assert a diagnosis that a generic finding does not, and SCT "Score" says nothing about what is scored.
CONFIDENCE = Code("111012", "DCM", "Certainty of Finding")
PERCENT = Code("%", "UCUM", "percent")


def procedure_for(sources: Sequence[Dataset]) -> Code:
    ds = sources[0]
    body = str(ds.get("BodyPartExamined", "")).upper()
    if ds.get("Modality") == "CT" and body in {"CHEST", "LUNG", "THORAX"}:
        return CT_OF_CHEST
    return IMAGING_PROCEDURE


def _measurements(f: Finding, algo: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    out = []
    for m in f.measurements:
        if m.unit.scheme != "UCUM":
            raise ValueError(f"finding {f.tracking_id}: unit {m.unit.value!r} of '{m.concept.meaning}' is "
                             f"{m.unit.scheme}, not UCUM")
        if not math.isfinite(m.value):
            raise ValueError(f"finding {f.tracking_id}: '{m.concept.meaning}' is {m.value}")
        out.append(hd.sr.Measurement(name=coded(m.concept), value=float(m.value), unit=coded(m.unit),
                                     algorithm_id=algo))
    if f.confidence is not None:
        if not 0.0 <= f.confidence <= 1.0:
            raise ValueError(f"finding {f.tracking_id}: confidence {f.confidence} is outside 0..1")
        out.append(hd.sr.Measurement(name=coded(CONFIDENCE), value=round(100.0 * float(f.confidence), 2),
                                     unit=coded(PERCENT), algorithm_id=algo))
    return out


@dataclass(frozen=True)
class SegmentReference:
    """What the SR needs of a SEG segment. The SEG's UIDs are derived, so this is known before the SEG is built
    and the SR can be built at the same time (node/results/sr_process.py)."""

    study_uid: str
    series_uid: str  # the SEG's series
    sop_instance_uid: str  # the SEG's
    source_series_uid: str  # the series the SEG segments
    segment_number: int
    sop_class_uid: str = str(SegmentationStorage)

    def evidence(self) -> Dataset:
        """The SEG as the SR's evidence lists it."""
        ds = Dataset()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study_uid, self.series_uid
        ds.SOPClassUID, ds.SOPInstanceUID = self.sop_class_uid, self.sop_instance_uid
        return ds


def build_sr(
    findings: Sequence[Finding],
    sources: Mapping[str, Sequence[Dataset]],
    segs: Mapping[str, SegmentReference],
    *,
    name: str,
    version: str,
    observer_uid: str,
    tracking_uid: Callable[[str], str],
    series_uid: str,
    sop_uid: str,
    manufacturer: str,
    device_serial: str,
    parameters: Mapping[str, str] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """`segs` maps a segment label to where that segment is."""
    all_sources = [ds for series in sources.values() for ds in series]
    algo = hd.sr.AlgorithmIdentification(
        name=name, version=version, family=codes.cid7162.ArtificialIntelligence,
        parameters=[f"{k}={v}" for k, v in parameters.items()] if parameters else None)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=observer_uid, name=name, manufacturer_name=manufacturer, model_name=version,
            serial_number=device_serial),
    )
    groups = []
    # A finding without a segment (e.g. a total) was measured on the job's series: its group cites them all.
    # Made only where there is one: 0.1 s for 300 slices, for nothing in a report of segmented findings.
    source_images = ([hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in all_sources]
                     if any(f.segment_label is None for f in findings) else [])
    for f in findings:
        common = dict(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(f.tracking_id), identifier=f.tracking_id),
            finding_type=coded(f.finding_type),
            algorithm_id=algo,
            finding_sites=[hd.sr.FindingSite(coded(f.finding_site))] if f.finding_site else None,
            measurements=_measurements(f, algo),
        )
        if f.segment_label is not None:
            if f.segment_label not in segs:
                raise ValueError(f"finding {f.tracking_id} names segment '{f.segment_label}', "
                                 f"which no segmentation in the result has")
            seg = segs[f.segment_label]
            ref = hd.sr.ReferencedSegment(
                sop_class_uid=seg.sop_class_uid, sop_instance_uid=seg.sop_instance_uid,
                segment_number=seg.segment_number, source_series=hd.sr.SourceSeriesForSegmentation(seg.source_series_uid))
            groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=ref, **common))
        else:
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(source_images=source_images, **common))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=coded(procedure_for(all_sources)),
        imaging_measurements=groups,
    )
    unique_segs = {seg.sop_instance_uid: seg.evidence() for seg in segs.values()}
    evidence = list(all_sources) + list(unique_segs.values())
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_uid,
        series_number=9002,
        sop_instance_uid=sop_uid,
        instance_number=1,
        manufacturer=manufacturer,
        series_description=f"AI {name} {version} measurements",
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
