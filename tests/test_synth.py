"""The synthetic chest CT: deterministic, valid CT Image IOD, every transfer syntax decodes to the same HU."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest

from node.synth import write_chest_ct
from node.synth.chest_ct import SUPPORTED_SYNTAXES


def hu(path):
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_deterministic_and_truth_consistent(tmp_path):
    a = write_chest_ct(tmp_path / "a", slices=30, rows=128, cols=128, pixel_spacing=2.8, seed=4)
    b = write_chest_ct(tmp_path / "b", slices=30, rows=128, cols=128, pixel_spacing=2.8, seed=4)
    assert a.study_uid == b.study_uid and a.series_uid == b.series_uid
    assert all(fa.read_bytes() == fb.read_bytes() for fa, fb in zip(a.files, b.files))
    c = write_chest_ct(tmp_path / "c", slices=30, rows=128, cols=128, pixel_spacing=2.8, seed=4, study_uid="1.2.3.4")
    assert c.series_uid != a.series_uid
    truth = json.loads(a.truth_path.read_text())
    assert truth == a.truth
    assert truth["total_lung_ml"] == pytest.approx(truth["left_lung_ml"] + truth["right_lung_ml"], abs=0.01)
    assert 200 < truth["left_lung_ml"] < 4000 and 200 < truth["right_lung_ml"] < 4000  # a 75 mm scan
    assert len(truth["nodules"]) == 3


def test_anatomy_hu(tmp_path):
    r = write_chest_ct(tmp_path / "ct", slices=40, seed=1)
    ds = pydicom.dcmread(r.files[20])
    assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
    assert (ds.Rows, ds.Columns) == (512, 512) and ds.RescaleType == "HU"
    img = hu(r.files[20])
    assert img[0, 0] == pytest.approx(-1000, abs=30)  # air outside the body
    assert img.max() >= 600  # bone
    lung_like = (img < -700) & (img > -950)
    assert lung_like.sum() > 5000
    zs = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in r.files]
    assert np.allclose(np.diff(zs), -2.5)


def test_same_bytes_in_another_process(tmp_path):
    """No per-process salt (str hash, time, random UIDs) may leak into the files."""
    code = ("import sys, hashlib; from pathlib import Path; from node.synth import write_chest_ct; "
            "r = write_chest_ct(Path(sys.argv[1]), slices=10, rows=64, cols=64, pixel_spacing=5.6, seed=9); "
            "print(hashlib.sha256(b''.join(f.read_bytes() for f in r.files)).hexdigest())")
    digests = set()
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / hash_seed)], capture_output=True, text=True,
                             timeout=120, check=True, env={"PYTHONHASHSEED": hash_seed, "PATH": "/usr/bin:/bin"})
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_header_and_truth_match_the_image(tmp_path):
    r = write_chest_ct(tmp_path / "ct", slices=60, slice_thickness=2.5, seed=3)
    first = pydicom.dcmread(r.files[0])
    assert (first.BitsAllocated, first.BitsStored, first.HighBit, first.PixelRepresentation) == (16, 16, 15, 1)
    assert first.ImageType == ["ORIGINAL", "PRIMARY", "AXIAL"] and first.PatientPosition == "HFS"
    assert first.Manufacturer == "AINODE-SYNTH" and first.StudyInstanceUID == r.study_uid
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    vol = np.stack([hu(f) for f in r.files])  # file order: head to feet
    voxel_ml = 0.7 * 0.7 * 2.5 / 1000
    lung_like = (vol > -950) & (vol < -650)
    # Lung is everything lung-like plus the vessels and nodules inside it, so a little more.
    assert 0.95 < lung_like.sum() * voxel_ml / r.truth["total_lung_ml"] <= 1.0
    # Patient left is +x, the higher column index.
    left_like = lung_like[:, :, 256:].sum() * voxel_ml
    assert 0.95 < left_like / r.truth["left_lung_ml"] <= 1.0
    # No lung in the first and last slices; the trachea (air) in the top slice, inside the body.
    assert not lung_like[0].any() and not lung_like[-1].any()
    assert (vol[0, 200:312, 200:312] < -950).sum() * 0.49 > 150  # a ~18 mm trachea
    assert vol[0, 200:312, 200:312].max() < 600
    for n in r.truth["nodules"]:
        x, y, z = n["center_mm"]
        k = int(round((float(first.ImagePositionPatient[2]) - z) / 2.5))
        i, j = (int(round((c - float(first.ImagePositionPatient[a])) / 0.7)) for a, c in ((1, y), (0, x)))
        assert vol[k, i, j] == pytest.approx(30, abs=1), n
        assert (j > 256) == (n["side"] == "left") and 4 <= n["diameter_mm"] <= 12


@pytest.mark.parametrize("ts_name", sorted(SUPPORTED_SYNTAXES))
def test_each_transfer_syntax_round_trips(tmp_path, ts_name):
    kw = dict(slices=12, rows=96, cols=96, pixel_spacing=3.7, seed=2)
    ref = write_chest_ct(tmp_path / "ref", **kw)
    enc = write_chest_ct(tmp_path / ts_name, transfer_syntax=ts_name, **kw)
    for f_ref, f_enc in zip(ref.files[::5], enc.files[::5]):
        ds = pydicom.dcmread(f_enc)
        assert ds.file_meta.TransferSyntaxUID == SUPPORTED_SYNTAXES[ts_name]
        assert np.array_equal(hu(f_ref), hu(f_enc))


# dciodvfy of this dicom3tools build cannot read deflated files ("Dicom dataset read failed"); the same
# dataset written by the generator in the other syntaxes is checked here, and dcmtk reads the deflated one.
@pytest.mark.parametrize("ts_name", sorted(set(SUPPORTED_SYNTAXES) - {"DeflatedExplicitVRLittleEndian"}))
def test_passes_dciodvfy(tmp_path, ts_name):
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy not found: apt-get install dicom3tools")
    r = write_chest_ct(tmp_path / "ct", slices=12, transfer_syntax=ts_name)
    out = subprocess.run(["dciodvfy", str(r.files[6])], capture_output=True, text=True, timeout=60)
    errors = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")]
    assert errors == []


def test_cli(tmp_path):
    from node.cli import main

    assert main(["synth", "--out", str(tmp_path / "ct"), "--slices", "12", "--transfer-syntax", "RLELossless"]) == 0
    assert len(list((tmp_path / "ct").glob("CT*.dcm"))) == 12
