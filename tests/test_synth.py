"""The synthetic chest CT: deterministic, valid CT Image IOD, every transfer syntax decodes to the same HU."""

import json
import shutil
import subprocess

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


@pytest.mark.parametrize("ts_name", sorted(SUPPORTED_SYNTAXES))
def test_each_transfer_syntax_round_trips(tmp_path, ts_name):
    kw = dict(slices=12, rows=96, cols=96, pixel_spacing=3.7, seed=2)
    ref = write_chest_ct(tmp_path / "ref", **kw)
    enc = write_chest_ct(tmp_path / ts_name, transfer_syntax=ts_name, **kw)
    for f_ref, f_enc in zip(ref.files[::5], enc.files[::5]):
        ds = pydicom.dcmread(f_enc)
        assert ds.file_meta.TransferSyntaxUID == SUPPORTED_SYNTAXES[ts_name]
        assert np.array_equal(hu(f_ref), hu(f_enc))


def test_passes_dciodvfy(tmp_path):
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy not found: apt-get install dicom3tools")
    r = write_chest_ct(tmp_path / "ct", slices=12)
    out = subprocess.run(["dciodvfy", str(r.files[6])], capture_output=True, text=True, timeout=60)
    errors = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")]
    assert errors == []


def test_cli(tmp_path):
    from node.cli import main

    assert main(["synth", "--out", str(tmp_path / "ct"), "--slices", "12", "--transfer-syntax", "RLELossless"]) == 0
    assert len(list((tmp_path / "ct").glob("CT*.dcm"))) == 12
