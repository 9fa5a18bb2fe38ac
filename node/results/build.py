"""A plugin's result → DICOM objects in the source study (SEG first, then the SR citing it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from pydicom.dataset import Dataset

from node.plugin_api import PluginResult

from .seg import build_seg
from .sr import build_sr
from .uids import derive_uid


@dataclass(frozen=True)
class BuiltObject:
    kind: str  # "SEG" or "SR"; "GSPS" or "SC" from node/results/fallback.py
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    dataset: Dataset


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str  # plugin name, e.g. "ct_lung"
    version: str  # plugin version, e.g. "1.0.0"
    model_name: str | None = None
    model_version: str | None = None
    weights_sha256: str | None = None
    not_for_clinical_use: bool = False  # from the model manifest; the RIS message and viewers show it


def source_study(sources: Mapping[str, Sequence[Dataset]]) -> str:
    """The one study all source series belong to: every result object goes into it."""
    if not sources or not all(sources.values()):
        raise ValueError("no source series (or an empty one) given")
    studies = {str(ds.StudyInstanceUID) for series in sources.values() for ds in series}
    if len(studies) != 1:
        raise ValueError(f"source series span {len(studies)} studies; results go into exactly one")
    return studies.pop()


def algorithm_parameters(algorithm: AlgorithmInfo) -> dict[str, str]:
    """Model identity, recorded as algorithm parameters in the SEG and in every SR measurement."""
    fields = {"model_name": algorithm.model_name, "model_version": algorithm.model_version,
              "weights_sha256": algorithm.weights_sha256}
    out = {k: str(v) for k, v in fields.items() if v}
    if algorithm.not_for_clinical_use:
        out["not_for_clinical_use"] = "true"
    return out


def build_results(result: PluginResult, sources: Mapping[str, Sequence[Dataset]], algorithm: AlgorithmInfo,
                  *, manufacturer: str = "AINODE", device_serial: str = "ainode-0",
                  on_built: Callable[[BuiltObject], None] | None = None) -> list[BuiltObject]:
    """One SEG per segmentation (in result order), then one TID 1500 Comprehensive 3D SR if there are findings.

    `sources` maps each source series UID to its datasets (headers suffice; pixel data is never decoded)
    in the order of the plugin's volume axis 0. Every UID is derived from (study, source series, plugin
    name, plugin version, kind, index) and not from the instances, so re-running the same plugin version
    on the same series re-creates the same UIDs and the PACS replaces the earlier objects; a new plugin
    version gives new objects beside the old ones.

    `on_built` is called with each object as soon as it is made (the SEG before the SR is built), so a
    caller can write and validate one object while the next is built.
    """
    study_uid = source_study(sources)
    base = (study_uid, *sorted(sources), algorithm.name, algorithm.version)
    params = algorithm_parameters(algorithm)
    out: list[BuiltObject] = []
    seg_refs: dict[str, tuple] = {}  # segment label -> (SEG, source series UID, segment number)
    for i, segmentation in enumerate(result.segmentations):
        src = sources.get(segmentation.source_series_uid)
        if src is None:
            raise ValueError(f"segmentation refers to series {segmentation.source_series_uid}, "
                             f"which is not among the job's series")
        # One series per SEG: each SEG carries its source series' frame of reference, and a series has one.
        # A SEG's UIDs depend on its own source series only, so another series joining the study (and so
        # the SR's inputs) does not orphan a SEG that the PACS already holds.
        seg_base = (study_uid, segmentation.source_series_uid, algorithm.name, algorithm.version, "SEG", str(i))
        seg = build_seg(segmentation, src, name=algorithm.name, version=algorithm.version,
                        series_uid=derive_uid(*seg_base, "series"), sop_uid=derive_uid(*seg_base),
                        manufacturer=manufacturer, device_serial=device_serial, parameters=params)
        for n, s in enumerate(segmentation.segments, start=1):
            if s.label in seg_refs:
                raise ValueError(f"segment label '{s.label}' is used twice in the result; findings link to "
                                 f"segments by label, so labels must be unique")
            seg_refs[s.label] = (seg, segmentation.source_series_uid, n)
        out.append(BuiltObject("SEG", str(seg.SOPClassUID), str(seg.SOPInstanceUID),
                               str(seg.SeriesInstanceUID), seg))
        if on_built:
            on_built(out[-1])
    if result.findings:
        sr = build_sr(result.findings, sources, seg_refs, name=algorithm.name, version=algorithm.version,
                      observer_uid=derive_uid("device", manufacturer, device_serial, algorithm.name),
                      tracking_uid=lambda tid: derive_uid(*base, "tracking", tid),
                      series_uid=derive_uid(*base, "SR", "series"), sop_uid=derive_uid(*base, "SR", "0"),
                      manufacturer=manufacturer, device_serial=device_serial, parameters=params)
        out.append(BuiltObject("SR", str(sr.SOPClassUID), str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID), sr))
        if on_built:
            on_built(out[-1])
    return out
