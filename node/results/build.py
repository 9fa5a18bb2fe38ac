"""A plugin's result → DICOM objects in the source study (SEG first, then the SR citing it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pydicom.dataset import Dataset

from node.plugin_api import PluginResult

from .seg import build_seg
from .sr import SegmentReference, build_sr
from .uids import derive_uid


@dataclass(frozen=True)
class BuiltObject:
    kind: str  # "SEG" or "SR"; "GSPS" or "SC" from node/results/fallback.py
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    dataset: Dataset | None  # None when it was written to `path` elsewhere (the SR process)
    path: Path | None = None


@dataclass(frozen=True)
class WrittenSr:
    """An SR the SR process built and wrote to a file itself (handing the Dataset back cost the worker more
    to unpickle than the SR cost to build)."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: Path


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


# Builds the SR in another process and hands back a way to wait for it: given build_sr's arguments (with
# `tracking_uids`, a dict, in place of the `tracking_uid` function) and the file to write it to (or None),
# it returns a function that waits for the SR and returns it, or what it wrote (node/results/sr_process.py).
SrBuilder = Callable[[dict[str, Any], "Path | None"], Callable[[], "Dataset | WrittenSr"]]


def build_results(result: PluginResult, sources: Mapping[str, Sequence[Dataset]], algorithm: AlgorithmInfo,
                  *, manufacturer: str = "AINODE", device_serial: str = "ainode-0",
                  on_built: Callable[[BuiltObject], None] | None = None,
                  sr_builder: SrBuilder | None = None,
                  sr_file: Callable[[str], Path] | None = None) -> list[BuiltObject]:
    """One SEG per segmentation (in result order), then one TID 1500 Comprehensive 3D SR if there are findings.

    `sources` maps each source series UID to its datasets (headers suffice; pixel data is never decoded)
    in the order of the plugin's volume axis 0. Every UID is derived from (study, source series, plugin
    name, plugin version, kind, index) and not from the instances, so re-running the same plugin version
    on the same series re-creates the same UIDs and the PACS replaces the earlier objects; a new plugin
    version gives new objects beside the old ones.

    `on_built` is called with each object as soon as it is made (the SEG before the SR is built), so a
    caller can write and validate one object while the next is built. With `sr_builder`, the SR is built
    elsewhere while the SEGs are built here: the SR needs only the SEGs' derived UIDs, not the SEGs; and
    with `sr_file` (SOP instance UID -> temp file) it is written there too, and its object has no dataset.
    """
    study_uid = source_study(sources)
    base = (study_uid, *sorted(sources), algorithm.name, algorithm.version)
    params = algorithm_parameters(algorithm)
    plans = []  # (segmentation, its source datasets, SEG series UID, SEG SOP instance UID)
    seg_refs: dict[str, SegmentReference] = {}  # segment label -> where the SR finds it
    for i, segmentation in enumerate(result.segmentations):
        src = sources.get(segmentation.source_series_uid)
        if src is None:
            raise ValueError(f"segmentation refers to series {segmentation.source_series_uid}, "
                             f"which is not among the job's series")
        # One series per SEG: each SEG carries its source series' frame of reference, and a series has one.
        # A SEG's UIDs depend on its own source series only, so another series joining the study (and so
        # the SR's inputs) does not orphan a SEG that the PACS already holds.
        seg_base = (study_uid, segmentation.source_series_uid, algorithm.name, algorithm.version, "SEG", str(i))
        series_uid, sop_uid = derive_uid(*seg_base, "series"), derive_uid(*seg_base)
        for n, s in enumerate(segmentation.segments, start=1):
            if s.label in seg_refs:
                raise ValueError(f"segment label '{s.label}' is used twice in the result; findings link to "
                                 f"segments by label, so labels must be unique")
            seg_refs[s.label] = SegmentReference(study_uid, series_uid, sop_uid, segmentation.source_series_uid, n)
        plans.append((segmentation, src, series_uid, sop_uid))

    sr_args: dict[str, Any] | None = None
    pending_sr: Callable[[], Dataset] | None = None
    if result.findings:
        sr_args = dict(findings=list(result.findings), sources=sources, segs=seg_refs, name=algorithm.name,
                       version=algorithm.version,
                       observer_uid=derive_uid("device", manufacturer, device_serial, algorithm.name),
                       tracking_uids={f.tracking_id: derive_uid(*base, "tracking", f.tracking_id)
                                      for f in result.findings},
                       series_uid=derive_uid(*base, "SR", "series"), sop_uid=derive_uid(*base, "SR", "0"),
                       manufacturer=manufacturer, device_serial=device_serial, parameters=params)
        if sr_builder is not None and plans:  # with no SEG to build there is nothing to overlap
            pending_sr = sr_builder(sr_args, sr_file(sr_args["sop_uid"]) if sr_file else None)

    out: list[BuiltObject] = []
    try:
        for segmentation, src, series_uid, sop_uid in plans:
            seg = build_seg(segmentation, src, name=algorithm.name, version=algorithm.version,
                            series_uid=series_uid, sop_uid=sop_uid, manufacturer=manufacturer,
                            device_serial=device_serial, parameters=params)
            if str(seg.SOPClassUID) != SegmentReference.sop_class_uid:
                raise ValueError(f"highdicom made a SEG of SOP class {seg.SOPClassUID}, but the SR cites "
                                 f"{SegmentReference.sop_class_uid}")
            out.append(BuiltObject("SEG", str(seg.SOPClassUID), sop_uid, series_uid, seg))
            if on_built:
                on_built(out[-1])
    except BaseException:
        if pending_sr is not None:  # let the SR end, and remove the file it wrote: nothing else will
            try:
                sr = pending_sr()
            except Exception:  # noqa: BLE001 - the SEG's error is the one to report
                sr = None
            if isinstance(sr, WrittenSr):
                sr.path.unlink(missing_ok=True)
        raise
    if sr_args is not None:
        sr = pending_sr() if pending_sr is not None else build_sr_from(sr_args)
        if isinstance(sr, WrittenSr):
            out.append(BuiltObject("SR", sr.sop_class_uid, sr.sop_instance_uid, sr.series_instance_uid, None, sr.path))
        else:
            out.append(BuiltObject("SR", str(sr.SOPClassUID), str(sr.SOPInstanceUID), str(sr.SeriesInstanceUID), sr))
        if on_built:
            on_built(out[-1])
    return out


def build_sr_from(args: Mapping[str, Any]) -> Dataset:
    """build_sr from the arguments build_results collects (picklable: a dict of tracking UIDs, no function)."""
    kwargs = dict(args)
    tracking = kwargs.pop("tracking_uids")
    findings, sources, segs = kwargs.pop("findings"), kwargs.pop("sources"), kwargs.pop("segs")
    return build_sr(findings, sources, segs, tracking_uid=tracking.__getitem__, **kwargs)
