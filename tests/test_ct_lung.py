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


def _with(vol, pixels, origin=None, orientation=None):
    return SeriesVolume(vol.series_uid, vol.modality, pixels, vol.spacing, origin or vol.origin,
                        orientation or vol.orientation, vol.sop_instance_uids, vol.headers)


def test_touching_lungs_are_split_off_centre_and_feet_first(tmp_path):
    """Lungs joined by an air bridge across the mediastinum, the patient 60 mm off the scanner's x=0, and the
    slices stored head first with the columns running toward the patient's right: still two lungs, right sides."""
    r = write_chest_ct(tmp_path / "ct", slices=60, slice_thickness=5.0, seed=5)
    vol, _ = load_series(r.files)
    px = vol.pixels.copy()
    k0, k1 = 25, 35
    px[k0:k1, 250:262, 150:362] = -850.0  # anterior-junction-like bridge, 12 rows x 10 slices
    bridge_ml = (k1 - k0) * 12 * (362 - 150) * vol.voxel_volume_mm3 / 1000
    # Reverse the slice order and the columns; say so in the geometry (normal -z, row direction -x).
    nz, _, nc = px.shape
    x_first_col = vol.origin[0] + (nc - 1) * vol.spacing[2] + 60.0
    origin = (x_first_col, vol.origin[1], vol.origin[2] + (nz - 1) * vol.spacing[0])
    flipped = _with(vol, px[::-1, :, ::-1].copy(), origin, (-1, 0, 0, 0, 1, 0))
    result = CtLungPlugin().run(StudyInput("1.2.3", [flipped], Path(tmp_path)))
    by_id = {f.tracking_id: f.measurements[0].value for f in result.findings}
    for key, truth in (("left-lung", r.truth["left_lung_ml"]), ("right-lung", r.truth["right_lung_ml"])):
        assert abs(by_id[key] - truth) < 0.03 * truth + bridge_ml / 2, (key, by_id[key], truth)
    left, right = result.segmentations[0].segments
    # Columns now run toward the patient's right: the left lung is on the low column indices.
    assert np.flatnonzero(left.mask.any(axis=(0, 1))).mean() < nc / 2 < np.flatnonzero(right.mask.any(axis=(0, 1))).mean()
    # And the trachea (top of the volume is now slice 0) is not part of either lung.
    assert not (left.mask[:3] | right.mask[:3]).any()


def test_a_single_air_pocket_is_not_a_pair_of_lungs(tmp_path):
    pixels = np.full((30, 64, 64), 40.0, dtype=np.float32)
    pixels[:, :2, :] = -1000
    pixels[5:25, 10:54, 10:54] = -850  # one gas-filled region of about 100 mL, no second lung
    vol = SeriesVolume("1.2.3.4.6", "CT", pixels, (2.5, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0),
                       tuple(str(i) for i in range(30)), ())
    with pytest.raises(ValueError, match="1.2.3.4.6.*no lungs"):
        CtLungPlugin().run(StudyInput("1.2.3", [vol], Path(tmp_path)))
