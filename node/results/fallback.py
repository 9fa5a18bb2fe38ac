"""Viewer fallbacks: a plugin's result as a GSPS overlay and/or secondary-capture key images.

For destinations whose PACS or viewer cannot show SEG. Both go into the source study (same Study
Instance UID, patient and study modules copied from the source), one new series per kind, and every UID
is derived like the SEG/SR ones, so a re-run of the same plugin version replaces them in the PACS:
  series      (study, plugin name, version, kind)
  GSPS        (study, source series, plugin name, version)           one per source series
  key image   (study, source series, plugin name, version, source SOP instance)
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Mapping, Sequence

import numpy as np
from pydicom.dataset import Dataset

from node.plugin_api import PluginResult

from .build import AlgorithmInfo, BuiltObject, source_study
from .gsps import build_gsps
from .keyimage import build_key_image
from .overlay import BANNER, PALETTE, Overlay, algorithm_line, finding_text, key_slices
from .uids import derive_uid

FALLBACK_KINDS = frozenset({"GSPS", "SC"})


def build_fallbacks(result: PluginResult, sources: Mapping[str, Sequence[Dataset]], algorithm: AlgorithmInfo,
                    kinds: Collection[str], *, volumes: Mapping[str, Any] | None = None, max_key_images: int = 1,
                    manufacturer: str = "AINODE", device_serial: str = "ainode-0") -> list[BuiltObject]:
    """GSPS objects (one per source series with something to show), then key images, for `kinds` ⊆ {GSPS, SC}.

    `sources` is as for build_results (datasets per source series, in the order of the volume's axis 0).
    Key images need pixels: `volumes` maps a series UID to its array in modality units (HU) with the
    masks' shape, or to the plugin's SeriesVolume; without it the pixels are read from `sources`, which
    then must still carry PixelData. `max_key_images` is per finding (per segment without a finding):
    its slices with the largest cross-section. A result with neither findings nor segments gives [].
    """
    kinds = {kinds} if isinstance(kinds, str) else set(kinds)
    unknown = kinds - FALLBACK_KINDS
    if unknown:
        raise ValueError(f"unknown fallback kind(s) {sorted(unknown)}; choose from {sorted(FALLBACK_KINDS)}")
    if max_key_images < 1:
        raise ValueError(f"max_key_images must be at least 1, got {max_key_images}")
    study_uid = source_study(sources)
    if not kinds or not (result.findings or result.segmentations):
        return []
    overlays = _overlays(result, sources, study_uid, algorithm)
    segmented = {o.label for o in overlays}
    banner = [BANNER, algorithm_line(algorithm.name, algorithm.version, algorithm.model_name, algorithm.model_version),
              *(finding_text(f) for f in result.findings)]
    name, version = algorithm.name, algorithm.version
    common = dict(name=name, version=version, manufacturer=manufacturer, device_serial=device_serial)
    out: list[BuiltObject] = []
    # Series with outlines; with findings but no masks, every source series gets the text.
    shown = sorted({o.series_uid for o in overlays} or sources)
    if "GSPS" in kinds:
        series_uid = derive_uid(study_uid, name, version, "GSPS", "series")
        for n, src_series in enumerate(shown, start=1):
            pr = build_gsps(list(sources[src_series]), [o for o in overlays if o.series_uid == src_series], banner,
                            series_uid=series_uid, sop_uid=derive_uid(study_uid, src_series, name, version, "GSPS"),
                            instance_number=n, **common)
            out.append(_built("GSPS", pr))
    if "SC" in kinds:
        series_uid = derive_uid(study_uid, name, version, "SC", "series")
        lungish = any("lung" in o.text.lower() or "lung" in o.label.lower() for o in overlays)
        # Each key image lists the findings drawn on it (beside their outlines) and those without a mask.
        sc_banner = banner[:2] + [finding_text(f) for f in result.findings if f.segment_label not in segmented]
        n = 0
        for src_series, k in _key_images(result, overlays, sources, shown, segmented, max_key_images):
            header = sources[src_series][k]
            n += 1
            sc = build_key_image(header, _slice_pixels(volumes, sources, src_series, k),
                                 [o for o in overlays if o.series_uid == src_series], k, sc_banner,
                                 series_uid=series_uid,
                                 sop_uid=derive_uid(study_uid, src_series, name, version, "SC",
                                                    str(header.SOPInstanceUID)),
                                 instance_number=n, looks_like_lung=lungish, **common)
            out.append(_built("SC", sc))
    return out


def _built(kind: str, ds: Dataset) -> BuiltObject:
    return BuiltObject(kind, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), ds)


def _overlays(result: PluginResult, sources: Mapping[str, Sequence[Dataset]], study_uid: str,
              algorithm: AlgorithmInfo) -> list[Overlay]:
    """One overlay per segment, labelled with the finding that names it (tracking UID as in the SR)."""
    base = (study_uid, *sorted(sources), algorithm.name, algorithm.version)
    by_label = {f.segment_label: f for f in result.findings if f.segment_label is not None}
    out: list[Overlay] = []
    for segmentation in result.segmentations:
        src = sources.get(segmentation.source_series_uid)
        if src is None:
            raise ValueError(f"segmentation refers to series {segmentation.source_series_uid}, "
                             f"which is not among the job's series")
        expected = (len(src), int(src[0].Rows), int(src[0].Columns))
        for s in segmentation.segments:
            if (error := s.shape_error(expected, segmentation.source_series_uid)) is not None:
                raise ValueError(error)
            if any(o.label == s.label for o in out):
                raise ValueError(f"segment label '{s.label}' is used twice in the result; findings link to "
                                 f"segments by label, so labels must be unique")
            f = by_label.get(s.label)
            n = len(out) + 1
            out.append(Overlay(
                number=n, series_uid=segmentation.source_series_uid, label=s.label,
                text=finding_text(f) if f else s.type.meaning, mask=s.full_mask(expected),
                rgb=PALETTE[(n - 1) % len(PALETTE)],
                tracking=(f.tracking_id, derive_uid(*base, "tracking", f.tracking_id)) if f else None))
    return out


def _key_images(result: PluginResult, overlays: Sequence[Overlay], sources: Mapping[str, Sequence[Dataset]],
                shown: Sequence[str], segmented: Collection[str], per_item: int) -> list[tuple[str, int]]:
    """(series, slice) of each key image, without repeats: per finding with a segment, then per segment
    without a finding, its largest cross-sections; with no masks at all, the middle slice of each series."""
    if not overlays:
        return [(s, len(sources[s]) // 2) for s in shown]
    by_label = {o.label: o for o in overlays}
    items = [by_label[f.segment_label] for f in result.findings if f.segment_label in segmented]
    named = {o.label for o in items}
    items += [o for o in overlays if o.label not in named]
    keys: list[tuple[str, int]] = []
    for o in items:
        for k in key_slices(o.mask, per_item):
            if (o.series_uid, k) not in keys:
                keys.append((o.series_uid, k))
    return keys


def _slice_pixels(volumes: Mapping[str, Any] | None, sources: Mapping[str, Sequence[Dataset]], series_uid: str,
                  k: int) -> np.ndarray:
    """Slice k of the series in modality units (HU for CT)."""
    if volumes is not None and series_uid in volumes:
        pixels = np.asarray(getattr(volumes[series_uid], "pixels", volumes[series_uid])[k])
        ds = sources[series_uid][k]
        if pixels.shape != (int(ds.Rows), int(ds.Columns)):
            raise ValueError(f"volumes[{series_uid}] slice {k} is {pixels.shape}, but the series' images are "
                             f"{int(ds.Rows)}x{int(ds.Columns)}: pass the job's own volume")
        return pixels
    ds = sources[series_uid][k]
    if "PixelData" not in ds:
        raise ValueError(f"key images (SC) need the pixels of series {series_uid}, but its datasets carry no "
                         f"PixelData: pass volumes={{series_uid: SeriesVolume or HU array}} to build_fallbacks")
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return ds.pixel_array.astype(np.float32) * slope + intercept
