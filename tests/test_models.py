"""Model packages: hashes verified, versions immutable, and the model's identity in every result."""

import hashlib
from pathlib import Path

import pytest
import yaml

from node.models import ModelError, load_model
from node.models.lock import verify_models
from node.config.schema import NodeConfig
from node.store import Store
from node.synth import write_chest_ct
from tests.support.pipeline import send
from tests.support.wait import wait_until


def make_package(root: Path, name="demo", version="1.0.0", weights=b"\x00weights\x01") -> Path:
    folder = root / name / version
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(weights)
    manifest = {
        "name": name, "version": version, "description": "test package", "intended_use": "tests only",
        "not_for_clinical_use": True, "format": "torchscript",
        "weights": [{"file": "model.pt", "sha256": hashlib.sha256(weights).hexdigest()}],
        "input": {"spacing_mm": [2, 2, 2], "patch_size": [32, 64, 64], "hu_window": [-1000, 400]},
        "labels": [{"value": 1, "label": "Nodule",
                    "category": {"value": "49755003", "scheme": "SCT", "meaning": "Morphologically abnormal structure"},
                    "type": {"value": "27925004", "scheme": "SCT", "meaning": "Nodule"}}],
    }
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return folder


def test_a_verified_package_loads_with_its_identity(tmp_path):
    folder = make_package(tmp_path)
    m = load_model(tmp_path, "demo", "1.0.0")
    assert (m.name, m.version, m.weight_path()) == ("demo", "1.0.0", folder / "model.pt")
    assert m.weights_sha256 == hashlib.sha256(b"\x00weights\x01").hexdigest() and len(m.digest) == 64


def test_changed_weights_are_refused_naming_the_file(tmp_path):
    folder = make_package(tmp_path)
    (folder / "model.pt").write_bytes(b"retrained quietly")
    with pytest.raises(ModelError, match=r"model.pt: sha256 .* does not match the manifest.*new version"):
        load_model(tmp_path, "demo", "1.0.0")


def test_an_unlisted_file_and_a_bad_manifest_are_refused(tmp_path):
    folder = make_package(tmp_path)
    (folder / "extra.onnx").write_bytes(b"x")
    with pytest.raises(ModelError, match="files not listed in the manifest: extra.onnx"):
        load_model(tmp_path, "demo", "1.0.0")
    (folder / "extra.onnx").unlink()
    data = yaml.safe_load((folder / "manifest.yaml").read_text())
    del data["intended_use"]
    data["weights"][0]["sha256"] = "abc"
    (folder / "manifest.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ModelError) as exc:
        load_model(tmp_path, "demo", "1.0.0")
    assert "manifest.yaml: intended_use: Field required" in str(exc.value)
    assert "manifest.yaml: weights.0.sha256: String should match pattern" in str(exc.value)
    with pytest.raises(ModelError, match="no such model package .*versions of 'demo'.*1.0.0"):
        load_model(tmp_path, "demo", "2.0.0")


def test_a_version_whose_content_changes_after_first_use_is_refused(tmp_path):
    folder = make_package(tmp_path / "models")
    cfg = NodeConfig.model_validate({
        "plugins": {"lung": {"entry": "tests.plugins.with_model:LungWithModel"}},
        "rules": [{"name": "r", "series": {"modality": "CT"}, "plugin": "lung"}]})
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert [m.version for m in verify_models(cfg, tmp_path / "models", store)] == ["1.0.0"]
    # Someone swaps the weights and updates the manifest's hash to match: hashes agree, the version lies.
    new = b"other weights"
    (folder / "model.pt").write_bytes(new)
    data = yaml.safe_load((folder / "manifest.yaml").read_text())
    data["weights"][0]["sha256"] = hashlib.sha256(new).hexdigest()
    (folder / "manifest.yaml").write_text(yaml.safe_dump(data))
    load_model(tmp_path / "models", "demo", "1.0.0")  # self-consistent on its own
    with pytest.raises(ModelError, match="content changed since this node first used demo 1.0.0"):
        verify_models(cfg, tmp_path / "models", store)
    store.close()


def test_the_sr_and_audit_cite_the_model_and_a_changed_package_stops_the_node(tmp_path, node_factory, test_plugins):
    folder = make_package(tmp_path / "models")
    sha = hashlib.sha256(b"\x00weights\x01").hexdigest()
    node = node_factory({
        "storage": {"models_dir": str(tmp_path / "models")},
        "plugins": {"lung": {"entry": "tests.plugins.with_model:LungWithModel"}},
        "rules": [{"name": "r", "series": {"modality": "CT"}, "plugin": "lung"}],
    })
    ct = write_chest_ct(tmp_path / "ct", slices=40, slice_thickness=5.0)
    send(node, ct.files)
    end = wait_until(lambda: [r for r in node.audit_records() if r["event"] == "job-end"], 90, "job-end")[0]
    assert end["outcome"] == "success", end
    assert end["model"]["model"] == "demo" and end["model"]["weights_sha256"] == sha
    start = [r for r in node.audit_records() if r["event"] == "node-start"][0]
    assert start["models"][0]["not_for_clinical_use"] is True
    [sr_path] = (node.var / "results").rglob("SR-*.dcm")
    sr = sr_path.read_bytes()
    assert f"weights_sha256={sha}".encode() in sr and b"model_name=demo" in sr and b"model_version=1.0.0" in sr
    assert node.stop() == 0

    (folder / "model.pt").write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="refusing to start: .*model.pt: sha256"):
        node.start()
