"""run.gpu_decode (node/run/gpu_decode.py): JPEG 2000 slices decoded through nvImageCodec's pydicom plugin in the
job's process, the CPU decoders where it cannot.

nvImageCodec cannot run here (no GPU): a stand-in takes its module's place and decodes each frame with
pydicom's own pylibjpeg plugin, so what is tested is the node's side: the plugin registered and asked for
by name, every GPU-decodable slice sent to it in the job's process (no decode processes), the values the
CPU decode gives, the fall-back, and the worker's switch. bench/device/gpu_check.sh runs the real one.
"""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pydicom
import pytest
from pydicom.pixels.decoders import JPEG2000LosslessDecoder
from pydicom.pixels.decoders.pylibjpeg import _decode_frame as cpu_decode_frame

from node.config.schema import PluginSection, RunSection
from node.run import decode_pool, gpu_decode, series_loader
from node.run.job_process import PluginCache
from node.run.series_loader import load_series, read_file_decoded
from node.synth import write_chest_ct


class StandIn(types.ModuleType):
    """nvidia.nvimgcodec.tools.dicom.pydicom_plugin, decoding on the CPU."""

    def __init__(self, fail_on: int | None = None, start_error: Exception | None = None) -> None:
        super().__init__(gpu_decode.NVIMGCODEC_PLUGIN)
        self.calls = 0
        self.fail_on = fail_on
        self.start_error = start_error

    def _get_decoder_resources(self) -> object:
        if self.start_error is not None:
            raise self.start_error
        return object()

    def _decode_frame(self, src: bytes, runner) -> bytes:  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("Decoding failed: decoder.decode() returned None")
        return cpu_decode_frame(src, runner)


@pytest.fixture
def stand_in(monkeypatch):
    def install(**kwargs) -> StandIn:  # type: ignore[no-untyped-def]
        module = StandIn(**kwargs)
        monkeypatch.setitem(sys.modules, gpu_decode.NVIMGCODEC_PLUGIN, module)
        return module

    yield install
    gpu_decode.disable()  # pydicom's decoders are per process: leave them as they were


@pytest.fixture
def j2k_series(tmp_path):
    return sorted(write_chest_ct(tmp_path / "ct", slices=12, rows=64, cols=64,
                                 transfer_syntax="JPEG2000Lossless").files)


def no_decode_processes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a decode process was started for a slice the GPU decodes")

    monkeypatch.setattr(series_loader, "decode_files", refuse)
    monkeypatch.setattr(series_loader, "BackgroundDecode", refuse)


def test_enable_says_why_the_cpu_decoders_stay(monkeypatch, stand_in, j2k_series):
    assert gpu_decode.enable("cpu") == "the plugin runs on cpu"
    monkeypatch.setitem(sys.modules, gpu_decode.NVIMGCODEC_PLUGIN, None)  # not installed: import fails
    why = gpu_decode.enable("cuda:0")
    assert why is not None and "does not import" in why and "run.gpu_decode: false" in why
    stand_in(start_error=OSError("libnvjpeg2k.so.0: cannot open shared object file"))
    assert gpu_decode.enable("cuda:0") == ("nvImageCodec's decoder cannot start on cuda:0: OSError: "
                                           "libnvjpeg2k.so.0: cannot open shared object file")
    assert not gpu_decode.takes(pydicom.dcmread(j2k_series[0]))
    assert gpu_decode.PLUGIN not in JPEG2000LosslessDecoder.available_plugins


def test_a_jpeg2000_series_is_decoded_on_the_gpu_in_the_job_process(monkeypatch, stand_in, j2k_series):
    cpu, _ = load_series(j2k_series, decode_processes=1)
    module = stand_in()
    assert gpu_decode.enable("cuda:0") is None
    assert gpu_decode.PLUGIN in JPEG2000LosslessDecoder.available_plugins
    assert not decode_pool.slow_to_decode(pydicom.dcmread(j2k_series[0]))  # not for the decode processes
    no_decode_processes(monkeypatch)
    monkeypatch.setattr(series_loader, "processes_for", lambda files: 2)  # as on a machine with CPUs to spare
    gpu, headers = load_series(j2k_series)
    assert module.calls == len(j2k_series)
    assert np.array_equal(gpu.pixels, cpu.pixels) and gpu.pixels.dtype == np.float32
    assert all("PixelData" not in ds for ds in headers)
    ds, pixels = read_file_decoded(j2k_series[0])  # read-ahead in an idle worker decodes there too
    assert module.calls == len(j2k_series) + 1
    assert np.array_equal(pixels, pydicom.dcmread(j2k_series[0]).pixel_array)


def test_a_slice_the_gpu_cannot_decode_is_decoded_on_the_cpu(monkeypatch, stand_in, j2k_series, caplog):
    cpu, _ = load_series(j2k_series, decode_processes=1)
    module = stand_in(fail_on=3)
    assert gpu_decode.enable("cuda:0") is None
    no_decode_processes(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ainode.run"):
        gpu, _ = load_series(j2k_series)
    assert np.array_equal(gpu.pixels, cpu.pixels)
    assert module.calls == len(j2k_series)
    said = [r.getMessage() for r in caplog.records if "GPU decode failed" in r.getMessage()]
    assert len(said) == 1 and "decoder.decode() returned None" in said[0]
    module.fail_on = module.calls + 1
    with caplog.at_level(logging.WARNING, logger="ainode.run"):
        load_series(j2k_series)
    assert len([r for r in caplog.records if "GPU decode failed" in r.getMessage()]) == 1  # once per process


def test_other_syntaxes_keep_the_cpu_decoders(stand_in, tmp_path):
    module = stand_in()
    assert gpu_decode.enable("cuda:0") is None
    for syntax in ("RLELossless", "JPEGLSLossless", "ExplicitVRLittleEndian"):
        files = sorted(write_chest_ct(tmp_path / syntax, slices=10, rows=32, cols=32, transfer_syntax=syntax).files)
        ds = pydicom.dcmread(files[0])
        assert not gpu_decode.takes(ds)
        assert np.array_equal(decode_pool.pixels_of(ds, str(files[0])), pydicom.dcmread(files[0]).pixel_array)
    assert module.calls == 0


def test_the_worker_turns_it_on_for_a_plugin_on_a_gpu_only(monkeypatch, stand_in, j2k_series, caplog):
    assert RunSection().gpu_decode is False
    assert RunSection(gpu_decode=True).gpu_decode is True
    ds = pydicom.dcmread(j2k_series[0])
    stand_in()
    PluginCache({"ct_lung": PluginSection()}, gpu_decode=True).get("ct_lung")  # ct_lung runs on the CPU
    assert not gpu_decode.takes(ds)
    monkeypatch.setattr(PluginCache, "_device_for", lambda self, plugin: "cuda:0")
    PluginCache({"ct_lung": PluginSection()}).get("ct_lung")  # run.gpu_decode off
    assert not gpu_decode.takes(ds)
    monkeypatch.setitem(sys.modules, gpu_decode.NVIMGCODEC_PLUGIN, None)
    cache = PluginCache({"ct_lung": PluginSection()}, gpu_decode=True)
    with caplog.at_level(logging.WARNING, logger="ainode.run"):
        cache.get("ct_lung")
    assert not gpu_decode.takes(ds)
    assert cache.gpu_decode_off is not None and "does not import" in cache.gpu_decode_off
    assert any("run.gpu_decode is on but slices are decoded on the CPU plugin=ct_lung" in r.getMessage()
               for r in caplog.records)
    stand_in()
    PluginCache({"ct_lung": PluginSection()}, gpu_decode=True).get("ct_lung")
    assert gpu_decode.takes(ds)


def test_bench_gpu_decode_compares_the_nodes_gpu_path_with_its_cpu_path(monkeypatch, stand_in, capsys):
    """bench/gpu_decode.py's run.gpu_decode rows, with the stand-in for nvImageCodec's plugin."""
    import torch

    from bench.gpu_decode import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "nvidia", None)  # the batch rows: nvImageCodec itself is not there
    module = stand_in()
    assert main(["--slices", "10", "--repeat", "1", "--processes", "1"]) == 0
    out = capsys.readouterr().out
    assert "GPU, the node's load_series with run.gpu_decode" in out
    assert "run.gpu_decode: volume identical to the CPU one" in out
    assert module.calls == 20 and not gpu_decode.active()  # a warm-up and a timed load; then back to the CPU

    def corrupt(src, runner):  # type: ignore[no-untyped-def]
        return bytes(b ^ 1 for b in cpu_decode_frame(src, runner))

    monkeypatch.setattr(module, "_decode_frame", corrupt)
    assert main(["--slices", "10", "--repeat", "1", "--processes", "1"]) == 1
    assert "run.gpu_decode: volume DIFFERS from the CPU one" in capsys.readouterr().out


def test_check_config_says_whether_slices_will_be_decoded_on_the_gpu(tmp_path, monkeypatch, stand_in):
    from node.config import load_config
    from node.run.slots import describe_slots

    def plan(run: str) -> str:
        path = tmp_path / "node.yaml"
        path.write_text(f"run: {run}\nplugins: {{ct_nodule: {{}}}}\nrules:\n  - {{name: nodules, plugin: ct_nodule}}\n")
        return describe_slots(load_config(path).config)

    assert "run.gpu_decode" not in plan("{gpu: {devices: [0], memory_mb: 8000}}")
    assert ("run.gpu_decode: on, but no plugin runs on a GPU: slices are decoded on the CPU"
            in plan("{gpu_decode: true, gpu: {devices: []}}"))
    monkeypatch.setitem(sys.modules, gpu_decode.NVIMGCODEC_PLUGIN, None)
    assert ("run.gpu_decode: on, but nvImageCodec's pydicom plugin does not import"
            in plan("{gpu_decode: true, gpu: {devices: [0], memory_mb: 8000}}"))
    stand_in()
    assert ("run.gpu_decode: GPU workers decode JPEG 2000, HTJ2K and JPEG slices on their GPU"
            in plan("{gpu_decode: true, gpu: {devices: [0], memory_mb: 8000}}"))
