"""ct_lung against the generator's exact truth."""

from pathlib import Path

import numpy as np
import pytest

from node.plugin_api import SeriesVolume, StudyInput
from node.run.series_loader import load_series
from node.synth import write_chest_ct
from plugins.ct_lung import CtLungPlugin


def run_on(files, tmp_path):
    vol, _ = load_series(files)
    return vol, CtLungPlugin().run(StudyInput("1.2.3", [vol], Path(tmp_path)))


@pytest.mark.parametrize("seed, slices, thickness", [(0, 100, 2.5), (7, 60, 5.0), (3, 160, 1.25)])
def test_volumes_within_3_percent_of_truth(tmp_path, seed, slices, thickness):
    r = write_chest_ct(tmp_path / "ct", slices=slices, slice_thickness=thickness, seed=seed)
    vol, result = run_on(r.files, tmp_path)
    by_id = {f.tracking_id: f.measurements[0].value for f in result.findings}
    for key, truth in (("left-lung", r.truth["left_lung_ml"]), ("right-lung", r.truth["right_lung_ml"]),
                       ("total-lung", r.truth["total_lung_ml"])):
        assert abs(by_id[key] - truth) / truth < 0.03, (key, by_id[key], truth)
    [seg] = result.segmentations
    assert seg.source_series_uid == r.series_uid
    assert [s.label for s in seg.segments] == ["left_lung", "right_lung"]
    assert all(s.mask.shape == vol.pixels.shape and s.mask.dtype == bool for s in seg.segments)
    assert not (seg.segments[0].mask & seg.segments[1].mask).any()
    assert result.findings[0].measurements[0].unit.value == "mL"
    assert "Left lung" in result.summary


def test_left_is_the_patients_left(tmp_path):
    r = write_chest_ct(tmp_path / "ct", slices=60, slice_thickness=5.0)
    vol, result = run_on(r.files, tmp_path)
    left = result.segmentations[0].segments[0]
    assert left.type.meaning == "Left lung"
    cols = np.flatnonzero(left.mask.any(axis=(0, 1)))
    # Standard orientation: patient left (+x) is the higher column index.
    assert cols.mean() > vol.pixels.shape[2] / 2
    # Mirror the image and say so in the geometry: the left lung must still be found on the patient's left.
    mirrored = SeriesVolume(vol.series_uid, vol.modality, vol.pixels[:, :, ::-1].copy(), vol.spacing,
                            (-vol.origin[0], vol.origin[1], vol.origin[2]), (-1, 0, 0, 0, 1, 0),
                            vol.sop_instance_uids, vol.headers)
    res2 = CtLungPlugin().run(StudyInput("1.2.3", [mirrored], Path(tmp_path)))
    left2 = res2.segmentations[0].segments[0]
    assert np.flatnonzero(left2.mask.any(axis=(0, 1))).mean() < vol.pixels.shape[2] / 2


def test_no_lungs_is_a_clear_error(tmp_path):
    pixels = np.full((30, 64, 64), 40.0, dtype=np.float32)
    pixels[:, :2, :] = -1000  # air outside the body only
    vol = SeriesVolume("1.2.3.4.5", "CT", pixels, (2.5, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0),
                       tuple(str(i) for i in range(30)), ())
    with pytest.raises(ValueError, match="1.2.3.4.5.*no lungs"):
        CtLungPlugin().run(StudyInput("1.2.3", [vol], Path(tmp_path)))
