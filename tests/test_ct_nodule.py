"""ct_nodule: the shipped model package, the plugin against synthetic truth, the CUDA out-of-memory back-off,
one inference code path for CPU and CUDA, and the SEG/SR built from its result (dciodvfy-valid, citing
the model). CPU only; the plugin runs on one small held-out synthetic case."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from node.models import load_model
from node.models.package import read_manifest, sha256_file
from node.plugin_api import SeriesVolume, StudyInput, available_plugins
from node.results import AlgorithmInfo, build_results, validate_with_dciodvfy
from plugins.ct_nodule import CtNodulePlugin, infer
from plugins.ct_nodule import plugin as plugin_module
from plugins.ct_nodule.post import affine, extract_nodules

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
PACKAGE = MODELS / "ct_nodule" / "0.1.0"
# Held out: training uses seeds 0..31, evaluate.py 1000..1011. This one has nodules of 11.2 (left), 9.5 (right)
# and 7.7 mm (left).
TEST_SEED = 2005
TEST_GEOMETRY = (100, 3.0, 192, 1.85)  # slices, mm, rows = columns, pixel mm: a small 300 mm scan


def _evaluate_module():
    spec = importlib.util.spec_from_file_location("ct_nodule_evaluate", MODELS / "ct_nodule" / "evaluate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


evaluate = _evaluate_module()


@pytest.fixture(scope="module")
def model():
    return load_model(MODELS, "ct_nodule", "0.1.0")


@pytest.fixture(scope="module")
def plugin(model):
    p = CtNodulePlugin()
    p.load_model(model)
    return p


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return evaluate.make_case(TEST_SEED, TEST_GEOMETRY, tmp_path_factory.mktemp("ct_nodule"))


@pytest.fixture(scope="module")
def result(plugin, case, tmp_path_factory):
    return plugin.run(StudyInput("1.2.3", [case.volume], tmp_path_factory.mktemp("scratch")))


@pytest.fixture(scope="module")
def small_cut(case):
    """The case cut to 20 slices of 80x80 pixels around its largest nodule: a cheap study for the tests that
    re-run the plugin. The cut goes through the body on all sides (the plugin mirrors the image there)."""
    vol = case.volume
    k, i, j = (int(v) for v in np.argwhere(case.masks[0]).mean(axis=0))
    k0, i0, j0 = max(0, k - 10), max(0, i - 40), max(0, j - 40)
    box = (slice(k0, k0 + 20), slice(i0, i0 + 80), slice(j0, j0 + 80))
    a = affine(vol.origin, vol.orientation, vol.spacing)
    origin = tuple(float(v) for v in a[:3, :3] @ [k0, i0, j0] + a[:3, 3])
    cut = SeriesVolume(vol.series_uid, vol.modality, vol.pixels[box].copy(), vol.spacing, origin, vol.orientation,
                       vol.sop_instance_uids[box[0]], tuple(vol.headers[box[0]]))  # headers: not read by the plugin
    return cut, box


@pytest.fixture(scope="module")
def small(small_cut):
    return small_cut[0]


def test_manifest_validates_and_matches_the_weights(model):
    m = read_manifest(PACKAGE / "manifest.yaml")
    assert (m.name, m.version, m.format) == ("ct_nodule", "0.1.0", "torchscript")
    assert m.not_for_clinical_use is True and "not for clinical use" in m.description
    assert sorted(p.name for p in PACKAGE.iterdir()) == ["manifest.yaml", "model.pt"]
    assert m.weights[0].sha256 == sha256_file(PACKAGE / "model.pt") == model.weights_sha256
    assert (PACKAGE / "model.pt").stat().st_size < 5 * 2**20
    assert {"script", "data", "date", "command"} <= set(m.training)
    assert m.metrics["sensitivity_ge_6mm"] >= 0.9 and m.metrics["dice_mean"] >= 0.7
    (label,) = m.labels
    assert (label.category.value, label.type.value) == ("49755003", "27925004")
    cls = CtNodulePlugin
    assert (cls.name, cls.version, cls.model_name, cls.model_version) == ("ct_nodule", "0.1.0", "ct_nodule", "0.1.0")
    assert cls.resources.gpu and cls.resources.gpu_memory_mb > 0
    assert available_plugins()["ct_nodule"].load() is CtNodulePlugin


def test_finds_the_nodules_of_a_held_out_case(case, result):
    segs = result.segmentations[0].segments
    pred = np.zeros(case.volume.pixels.shape, bool)
    shape = case.volume.pixels.shape
    for s in segs:  # each nodule as its box (Segment.offset), inside the series
        assert s.offset is not None and s.shape_error(shape, "x") is None and s.mask.dtype == bool
        assert s.mask.shape[0] < shape[0] and s.mask.any()
        assert (s.category.value, s.type.value) == ("49755003", "27925004")
        pred |= s.full_mask(shape)
    truth = np.zeros_like(pred)
    for m in case.masks:
        truth |= m
    assert evaluate.dice(pred, truth) >= 0.7
    big = [(n, m) for n, m in zip(case.nodules, case.masks) if n["diameter_mm"] >= 6.0]
    assert len(big) >= 2
    by_label = {f.segment_label: f for f in result.findings}
    for n, m in big:
        hits = [s for s in segs if (s.full_mask(shape) & m).any()]
        assert hits, f"missed the {n['diameter_mm']} mm nodule at {n['center_mm']}"
        f = by_label[hits[0].label]
        values = {meas.concept.meaning: (meas.value, meas.unit.value) for meas in f.measurements}
        diameter, unit = values["Long axis"]
        assert unit == "mm" and abs(diameter - n["diameter_mm"]) < 2.0
        volume, unit = values["Volume"]
        assert unit == "mm3" and volume == pytest.approx(m.sum() * case.volume.voxel_volume_mm3, rel=0.3)
        assert f.finding_site.meaning == {"left": "Left lung", "right": "Right lung"}[n["side"]]
        assert f.finding_site.value == {"left": "44029006", "right": "3341006"}[n["side"]]
        assert 0.5 < f.confidence <= 1.0
        assert f.finding_type.value == "27925004"
        # The centroid in patient coordinates (LPS mm) is in the tracking identifier.
        centre = [float(v) for v in re.search(r"\((.*)\) mm LPS", f.tracking_id).group(1).split(",")]
        assert np.linalg.norm(np.subtract(centre, n["center_mm"])) < 2.0, (f.tracking_id, n["center_mm"])
    assert set(result.timings) == {"preprocess_s", "inference_s", "postprocess_s"}
    assert result.gpu_memory_peak_mb is None  # CPU
    assert "not for clinical use" in result.summary


def test_oom_backoff_halves_the_batch_until_it_fits():
    tried = []

    def run(batch):
        tried.append(batch)
        if batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return f"done with {batch}"

    retries = []
    assert infer.with_oom_backoff(run, 16, on_retry=lambda b, e: retries.append(b)) == ("done with 2", 2)
    assert tried == [16, 8, 4, 2] and retries == [8, 4, 2]


def test_oom_at_batch_one_is_raised_and_other_errors_are_not_retried():
    tried = []

    def always(batch):
        tried.append(batch)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        infer.with_oom_backoff(always, 5)
    assert tried == [5, 2, 1]

    def broken(batch):
        tried.append(batch)
        raise ValueError("not memory")

    tried.clear()
    with pytest.raises(ValueError):
        infer.with_oom_backoff(broken, 8)
    assert tried == [8]


def test_plugin_reruns_the_study_with_half_the_batch_on_oom(plugin, small, monkeypatch, tmp_path):
    real = infer.predict_volume
    p = CtNodulePlugin({"batch_size": 4})
    p.load_model(plugin.model)
    first = p.run(StudyInput("1.2.3", [small], tmp_path))
    assert p.last_batch_size == 4 and first.findings
    calls = []

    def fails_above_one(net, image, patch, batch_size, amp, overlap=None, edge_pad=((0, 0),) * 3):
        calls.append(batch_size)
        if batch_size > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real(net, image, patch, batch_size, amp, overlap, edge_pad)

    monkeypatch.setattr(infer, "predict_volume", fails_above_one)
    again = p.run(StudyInput("1.2.3", [small], tmp_path))
    assert calls == [4, 2, 1] and p.last_batch_size == 1
    # BatchNorm in eval mode: a voxel's output does not depend on the batch, so the result is the same.
    assert [f.tracking_id for f in again.findings] == [f.tracking_id for f in first.findings]
    for a, b in zip(again.segmentations[0].segments, first.segmentations[0].segments):
        assert a.offset == b.offset and (a.mask == b.mask).all()


def test_cpu_and_cuda_share_one_inference_function(plugin, case, small, monkeypatch, tmp_path):
    # The plugin calls infer.predict_volume, whatever the device; only the Amp argument differs.
    seen = []
    real = infer.predict_volume

    def spy(net, image, patch, batch_size, amp, overlap=None, edge_pad=((0, 0),) * 3):
        seen.append((image.device.type, amp))
        return real(net, image, patch, batch_size, amp, overlap, edge_pad)

    monkeypatch.setattr(infer, "predict_volume", spy)
    plugin.run(StudyInput("1.2.3", [small], tmp_path))
    assert seen == [("cpu", infer.amp_for("cpu"))]
    cpu, cuda = infer.amp_for("cpu"), infer.amp_for("cuda:0")
    assert (cpu.device_type, cpu.enabled) == ("cpu", False)
    assert (cuda.device_type, cuda.enabled) == ("cuda", True) and cuda.dtype in (torch.float16, torch.bfloat16)
    assert not [name for name in vars(plugin_module) if "cpu" in name.lower() or "cuda" in name.lower()]

    # The same function with autocast on (bfloat16 on CPU standing in for CUDA's mixed precision) finds the
    # same nodule: only the precision differs. A small window: bfloat16 3-D convolutions are slow on CPUs
    # without AVX-512 (~4 s for 32^3 here).
    prep = infer.prepare(case.volume.pixels, case.volume.spacing, plugin.spacing, plugin.hu_window, "cpu")
    nodule = np.argwhere(case.masks[0]).mean(axis=0) - [s.start for s in prep.box]
    c = (nodule * np.asarray(prep.model_shape) / np.asarray(prep.crop_shape)).astype(int)
    window = (16, 32, 32)
    region = tuple(slice(max(0, v - w // 2), max(0, v - w // 2) + w) for v, w in zip(c, window))
    image = prep.image[region].contiguous()
    fp32 = real(plugin.net, image, window, 1, cpu)
    mixed = real(plugin.net, image, window, 1, infer.Amp("cpu", torch.bfloat16, True))
    assert fp32.dtype == mixed.dtype == torch.float32
    a, b = fp32 > 0.5, mixed > 0.5
    assert a.sum() > 0 and (a & b).sum() * 2 / (a.sum() + b.sum()) > 0.9


def test_prepared_ahead_gives_the_same_result_and_batch_scale_shrinks_the_batch(plugin, small, tmp_path):
    # The node calls `prepare` for the next study while the current one runs, and lowers `batch_scale`
    # after a CUDA out-of-memory error; neither may change the findings.
    plain = plugin.run(StudyInput("1.2.3", [small], tmp_path))
    study = StudyInput("1.2.3", [small], tmp_path)
    prepared = plugin.prepare(study)
    assert isinstance(prepared, infer.Prepared) and prepared.image.device.type == "cpu"
    ahead = plugin.run(StudyInput("1.2.3", [small], tmp_path, prepared=prepared, batch_scale=0.5))
    assert plugin.last_batch_size == 1  # the CPU default of 2, halved
    assert [f.measurements for f in ahead.findings] == [f.measurements for f in plain.findings]
    assert all(a.offset == b.offset and (a.mask == b.mask).all()
               for a, b in zip(ahead.segmentations[0].segments, plain.segmentations[0].segments))


def _onnx_package(tmp_path, model):
    """The shipped TorchScript weights exported to ONNX, as a package of its own (format: onnx)."""
    import yaml

    pkg = tmp_path / "models" / "ct_nodule" / "0.1.0"
    pkg.mkdir(parents=True)
    net = torch.jit.load(str(model.weight_path())).eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 64, 64, 64),), str(pkg / "model.onnx"), input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    manifest = model.manifest.model_dump(mode="json")
    manifest.update(format="onnx", weights=[{"file": "model.onnx", "sha256": sha256_file(pkg / "model.onnx")}])
    (pkg / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return tmp_path / "models"


def test_an_onnx_package_runs_through_onnxruntime_with_the_same_findings(model, plugin, small, tmp_path):
    from node.models import ModelError
    from node.models.runtime import OnnxNetwork, load_network

    onnx_model = load_model(_onnx_package(tmp_path, model), "ct_nodule", "0.1.0")
    onnx_plugin = CtNodulePlugin()
    onnx_plugin.load_model(onnx_model)
    assert isinstance(onnx_plugin.net, OnnxNetwork)
    # onnxruntime would start a thread per core: it gets the worker's share, as torch has it.
    assert onnx_plugin.net.session.get_session_options().intra_op_num_threads == torch.get_num_threads()
    x = torch.rand(2, 1, 64, 64, 64)
    assert torch.allclose(onnx_plugin.net(x), plugin.net(x), atol=1e-4)
    ours = plugin.run(StudyInput("1.2.3", [small], tmp_path))
    theirs = onnx_plugin.run(StudyInput("1.2.3", [small], tmp_path))
    assert [(f.finding_site, [m.value for m in f.measurements]) for f in theirs.findings] == \
        [(f.finding_site, [m.value for m in f.measurements]) for f in ours.findings]

    # A weight file replaced after the package was verified is refused at the load itself.
    weights = onnx_model.weight_path()
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(ModelError, match="sha256 changed after the package was verified"):
        load_network(onnx_model)


def test_no_nodule_gives_no_finding(plugin, case, small_cut, tmp_path):
    # The cut with its nodules painted over with lung (-850 HU, the generator's noise): no finding, also none
    # along the cut faces (infer.EDGE_PAD).
    small, box = small_cut
    pixels = small.pixels.copy()
    for m in case.masks:
        m = m[box]
        pixels[m] = -850.0 + np.random.default_rng(0).normal(0.0, 18.0, int(m.sum()))
    vol = SeriesVolume(small.series_uid, "CT", pixels, small.spacing, small.origin, small.orientation,
                       small.sop_instance_uids, small.headers)
    res = plugin.run(StudyInput("1.2.3", [vol], tmp_path))
    assert list(res.findings) == [] and list(res.segmentations) == [] and "No lung nodule" in res.summary


def test_seg_and_sr_pass_dciodvfy_and_cite_the_model(case, result, model, tmp_path):
    info = AlgorithmInfo("ct_nodule", "0.1.0", model_name=model.name, model_version=model.version,
                         weights_sha256=model.weights_sha256)
    objs = build_results(result, {case.volume.series_uid: list(case.headers)}, info)
    assert [o.kind for o in objs] == ["SEG", "SR"]
    for o in objs:
        path = tmp_path / f"{o.kind}.dcm"
        o.dataset.save_as(path, enforce_file_format=True)
        assert validate_with_dciodvfy(path) == [], o.kind
    seg, sr = objs[0].dataset, objs[1].dataset
    assert len(seg.SegmentSequence) == len(result.findings)
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("ct_nodule", "0.1.0")
    assert f"weights_sha256={model.weights_sha256}" in algo.AlgorithmParameters
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"

    def items(ds):
        for it in ds.get("ContentSequence", []):
            yield it
            yield from items(it)

    content = list(items(sr))
    texts = {i.TextValue for i in content if i.ValueType == "TEXT"}
    assert {"model_name=ct_nodule", "model_version=0.1.0", f"weights_sha256={model.weights_sha256}"} <= texts
    units = {i.ConceptNameCodeSequence[0].CodeMeaning:
             i.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for i in content if i.ValueType == "NUM"}
    assert units == {"Long axis": "mm", "Volume": "mm3", "Certainty of Finding": "%"}
    sites = {i.ConceptCodeSequence[0].CodeValue for i in content
             if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeMeaning == "Finding Site"}
    assert sites <= {"44029006", "3341006"} and sites


def test_extract_nodules_keeps_each_component_whole_and_apart_at_the_grid_edge():
    """Components found in the box of the voxels above threshold keep their full masks, positions and sizes:
    one touching the grid's corner, one in the middle, two one voxel apart (kept separate), a tiny one
    dropped. The model grid equals the source crop here, so each mask is its cube exactly."""
    shape = (30, 40, 50)
    prob = torch.zeros(shape)
    cubes = {"corner": (slice(0, 4), slice(0, 4), slice(0, 4)),
             "middle": (slice(12, 17), slice(15, 20), slice(20, 25)),
             "left": (slice(20, 23), slice(30, 33), slice(30, 33)),
             "right": (slice(20, 23), slice(30, 33), slice(34, 37))}
    for box in cubes.values():
        prob[box] = 0.9
    prob[28, 2, 45] = 0.9  # one voxel: under min_volume_mm3
    box = (slice(5, 35), slice(0, 40), slice(10, 60))  # where the crop lies in a larger source volume
    prep = infer.Prepared(image=torch.zeros(shape), box=box, crop_shape=shape, model_shape=shape,
                          source_spacing=(1.0, 1.0, 1.0))

    def voxels(n):  # the nodule's voxels on the source grid
        source = np.zeros((40, 40, 60), bool)
        source[n.mask_box] = n.mask
        return source

    def cube(name):
        source = np.zeros((40, 40, 60), bool)
        source[tuple(slice(sl.start + b.start, sl.stop + b.start) for sl, b in zip(cubes[name], box))] = True
        return source

    nodules = extract_nodules(prob, prep, (40, 40, 60), np.eye(4), threshold=0.5, min_volume_mm3=15.0)
    assert [n.volume_mm3 for n in nodules] == [125.0, 64.0, 27.0, 27.0]
    pair = sorted(nodules[2:], key=lambda n: n.centroid_index[2])
    for n, name in zip([*nodules[:2], *pair], ["middle", "corner", "left", "right"]):
        assert np.array_equal(voxels(n), cube(name)), name
        assert n.centroid_index == tuple(np.argwhere(cube(name)).mean(axis=0)), name
        assert n.confidence == pytest.approx(0.9)
    prob[cubes["corner"]] = 0.0  # the box of the rest starts inside the grid on every axis
    rest = extract_nodules(prob, prep, (40, 40, 60), np.eye(4), threshold=0.5, min_volume_mm3=15.0)
    assert [np.argwhere(voxels(n)).tolist() for n in rest] == \
        [np.argwhere(voxels(n)).tolist() for n in [nodules[0], *nodules[2:]]]
    assert extract_nodules(torch.zeros(shape), prep, (40, 40, 60), np.eye(4)) == []


def test_body_box_is_the_box_of_the_voxels_above_the_body_threshold_plus_its_margin():
    hu = torch.full((20, 30, 40), -1000.0)
    hu[5:8, 10:12, 3:30] = -400.0  # above BODY_MIN_HU
    hu[9, 25, 35] = -600.0  # below it: air, however bright
    m = [int(np.ceil(infer.BODY_MARGIN_MM / s)) for s in (2.0, 1.0, 1.0)]
    assert infer.body_box(hu, (2.0, 1.0, 1.0)) == (slice(max(0, 5 - m[0]), min(20, 8 + m[0])),
                                                   slice(max(0, 10 - m[1]), min(30, 12 + m[1])),
                                                   slice(max(0, 3 - m[2]), min(40, 30 + m[2])))
    whole = (slice(0, 20), slice(0, 30), slice(0, 40))
    assert infer.body_box(torch.full((20, 30, 40), -1000.0), (1.0, 1.0, 1.0)) == whole
