"""ct_lung: left and right lung volumes on chest CT, by classical image processing (no model)."""

from __future__ import annotations

import numpy as np

from node.plugin_api import (
    Accepts,
    Code,
    Finding,
    Measurement,
    Plugin,
    PluginResult,
    Resources,
    Segment,
    Segmentation,
    SeriesVolume,
    StudyInput,
)
from plugins.ct_lung.segment import NoLungsFound, segment_lungs

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
LUNG = Code("39607008", "SCT", "Lung")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
VOLUME = Code("118565006", "SCT", "Volume")
MILLILITER = Code("mL", "UCUM", "milliliter")
MIN_LUNG_ML = 10.0  # a smaller air pocket (bowel gas, a scan of the abdomen) is not a lung
POOL_TARGET_MM = 1.2  # in-plane grid of the component analysis; the masks stay full resolution


def superior_last(vol: SeriesVolume) -> bool:
    """True when increasing slice index moves toward the head (+z in LPS)."""
    normal = np.cross(np.asarray(vol.orientation[:3], float), np.asarray(vol.orientation[3:], float))
    return bool(normal[2] >= 0)


def patient_x_of_columns(vol: SeriesVolume) -> np.ndarray:
    """Patient x (LPS) of each column through the centre of the volume."""
    row_dir = np.asarray(vol.orientation[:3], float)
    col_dir = np.asarray(vol.orientation[3:], float)
    normal = np.cross(row_dir, col_dir)
    k_mid, i_mid = (vol.pixels.shape[0] - 1) / 2, (vol.pixels.shape[1] - 1) / 2
    j = np.arange(vol.pixels.shape[2])
    return (vol.origin[0] + j * vol.spacing[2] * row_dir[0] + i_mid * vol.spacing[1] * col_dir[0]
            + k_mid * vol.spacing[0] * normal[0])


class CtLungPlugin(Plugin):
    name = "ct_lung"
    version = "1.0.0"
    accepts = Accepts(modalities=("CT",), min_slices=20)
    resources = Resources(gpu=False, memory_mb=2048)

    def run(self, study: StudyInput) -> PluginResult:
        if not study.series:
            raise ValueError(f"study {study.study_uid}: no series given to ct_lung")
        vol = max(study.series, key=lambda s: s.pixels.shape[0])
        if vol.pixels.shape[0] < self.accepts.min_slices:
            raise ValueError(f"series {vol.series_uid}: {vol.pixels.shape[0]} slices, "
                             f"ct_lung needs at least {self.accepts.min_slices}")
        try:
            pool = int(self.options.get("pool", max(1, round(POOL_TARGET_MM / min(vol.spacing[1:])))))
            masks = segment_lungs(vol.pixels, patient_x_of_columns(vol), superior_last(vol), pool=pool,
                                  min_lung_voxels=int(MIN_LUNG_ML * 1000.0 / vol.voxel_volume_mm3))
        except NoLungsFound as exc:
            raise ValueError(f"series {vol.series_uid}: no lungs found ({exc})") from exc
        ml = vol.voxel_volume_mm3 / 1000.0
        left_ml = float(masks.left.sum()) * ml
        right_ml = float(masks.right.sum()) * ml
        segments = [
            Segment("left_lung", masks.left, ANATOMICAL_STRUCTURE, LEFT_LUNG),
            Segment("right_lung", masks.right, ANATOMICAL_STRUCTURE, RIGHT_LUNG),
        ]

        def volume(value: float) -> list[Measurement]:
            return [Measurement(VOLUME, round(value, 1), MILLILITER)]

        findings = [
            Finding("left-lung", LUNG, volume(left_ml), finding_site=LEFT_LUNG, segment_label="left_lung"),
            Finding("right-lung", LUNG, volume(right_ml), finding_site=RIGHT_LUNG, segment_label="right_lung"),
            Finding("total-lung", LUNG, volume(left_ml + right_ml), finding_site=LUNG),
        ]
        return PluginResult(
            findings=findings,
            segmentations=[Segmentation(vol.series_uid, segments)],
            summary=f"Left lung {left_ml:.1f} mL, right lung {right_ml:.1f} mL, total {left_ml + right_ml:.1f} mL",
        )
