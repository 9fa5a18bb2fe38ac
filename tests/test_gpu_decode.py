"""run.gpu_decode (node/run/gpu_decode.py): JPEG 2000 slices decoded through nvImageCodec's pydicom plugin in the
job's process, the CPU decoders where it cannot.

nvImageCodec cannot run here (no GPU): a stand-in takes its plugin module's place and decodes with openjpeg,
so what is tested is the node's side: the plugin registered and asked for by name, every GPU-decodable
slice sent to it in the job's process (no decode processes), a series' slices decoded in batched calls,
the values the CPU decode gives, the fall-backs, and the worker's switch. bench/device/gpu_check.sh runs
the real one.
"""

from __future__ import annotations

import logging
import os
import sys
import types

import numpy as np
import openjpeg
import pydicom
import pytest
from pydicom.pixels.decoders import JPEG2000LosslessDecoder

from node.config.schema import PluginSection, RunSection
from node.run import decode_pool, gpu_decode, series_loader
from node.run.job_process import PluginCache
from node.run.series_loader import load_series, read_file_decoded
from node.synth import write_chest_ct


class FakeImage:
    """An nvImageCodec image: `.cpu()` gives what numpy reads."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def cpu(self) -> np.ndarray:
        return self.array


class FakeDecoder:
    """nvimgcodec.Decoder, decoding on the CPU (openjpeg): one code stream, or a list of them in one call."""

    def __init__(self) -> None:
        self.single = 0  # calls for one frame
        self.batches: list[int] = []  # frames per batched call
        self.batch_error: Exception | None = None

    def decode(self, src, params=None):  # type: ignore[no-untyped-def]
        if isinstance(src, list):
            self.batches.append(len(src))
            if self.batch_error is not None:
                raise self.batch_error
            return [FakeImage(openjpeg.decode(s)) for s in src]
        self.single += 1
        return FakeImage(openjpeg.decode(src))


class StandIn(types.ModuleType):
    """nvidia.nvimgcodec.tools.dicom.pydicom_plugin, decoding on the CPU: its decoder is a module global made
    on first use, and its per-frame call decodes through it, as nvImageCodec 0.9's plugin does."""

    def __init__(self, fail_on: int | None = None, start_error: Exception | None = None,
                 batchable: bool = True) -> None:
        super().__init__(gpu_decode.NVIMGCODEC_PLUGIN)
        self.calls = 0
        self.fail_on = fail_on
        self.start_error = start_error
        self.made = FakeDecoder()
        if batchable:  # a release of the plugin without these decodes slice by slice
            self._NVIMGCODEC_DECODER = None
            self.nvimgcodec = types.SimpleNamespace(DecodeParams=lambda **kw: kw,
                                                    ColorSpec=types.SimpleNamespace(UNCHANGED="unchanged"))

    def _get_decoder_resources(self) -> object:
        if self.start_error is not None:
            raise self.start_error
        if not hasattr(self, "_NVIMGCODEC_DECODER"):
            return self.made
        if self._NVIMGCODEC_DECODER is None:
            self._NVIMGCODEC_DECODER = self.made
        return self._NVIMGCODEC_DECODER

    def _decode_frame(self, src: bytes, runner) -> bytes:  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("Decoding failed: decoder.decode() returned None")
        return np.ascontiguousarray(np.asarray(self._get_decoder_resources().decode(src).cpu())).tobytes()


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
    cpu, _ = load_series(j2k_series, decode_processes=0)
    module = stand_in()
    assert gpu_decode.enable("cuda:0") is None
    assert gpu_decode.PLUGIN in JPEG2000LosslessDecoder.available_plugins
    assert not decode_pool.slow_to_decode(pydicom.dcmread(j2k_series[0]))  # not for the decode processes
    no_decode_processes(monkeypatch)
    monkeypatch.setattr(decode_pool, "processes_for", lambda files: 2)  # as on a machine with CPUs to spare
    gpu, headers = load_series(j2k_series)
    assert module.calls == len(j2k_series)
    assert np.array_equal(gpu.pixels, cpu.pixels) and gpu.pixels.dtype == np.float32
    assert all("PixelData" not in ds for ds in headers)
    ds, pixels = read_file_decoded(j2k_series[0])  # read-ahead in an idle worker decodes there too
    assert module.calls == len(j2k_series) + 1
    assert np.array_equal(pixels, pydicom.dcmread(j2k_series[0]).pixel_array)


def test_a_slice_the_gpu_cannot_decode_is_decoded_on_the_cpu(monkeypatch, stand_in, j2k_series, caplog):
    cpu, _ = load_series(j2k_series, decode_processes=0)
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


def test_a_series_is_decoded_in_batched_calls(monkeypatch, stand_in, j2k_series):
    """One nvImageCodec call per slice costs 8x what a batch does on an H100 (bench/gpu_decode.py)."""
    cpu, _ = load_series(j2k_series, decode_processes=0)
    module = stand_in()
    assert gpu_decode.enable("cuda:0") is None
    no_decode_processes(monkeypatch)
    monkeypatch.setattr(gpu_decode, "BATCH_FRAMES", 5)
    gpu, _ = load_series(j2k_series)
    assert module.made.batches == [5, 5, 2] and module.made.single == 0
    assert module.calls == len(j2k_series)  # pydicom's per-frame handling still runs for every slice
    assert np.array_equal(gpu.pixels, cpu.pixels)
    assert gpu_decode._batched is not None and gpu_decode._batched.ready == {}  # nothing held after the series
    gpu_decode.disable()
    assert module._NVIMGCODEC_DECODER is module.made  # the plugin has its own decoder back


def test_two_batches_at_once_keep_each_others_slices(stand_in, j2k_series):
    """A prefetch's batch beside the job's: the one that ends first leaves the other's slices there."""
    stand_in()
    assert gpu_decode.enable("cuda:0") is None
    first, second = ([pydicom.dcmread(f) for f in half] for half in (j2k_series[:6], j2k_series[6:]))
    with gpu_decode.batch(first):
        with gpu_decode.batch(second):
            assert len(gpu_decode._batched.ready) == 12
        assert len(gpu_decode._batched.ready) == 6
        assert np.array_equal(gpu_decode.pixel_array(first[0]), pydicom.dcmread(j2k_series[0]).pixel_array)
    assert gpu_decode._batched.ready == {}


def test_a_batch_that_fails_is_decoded_slice_by_slice(monkeypatch, stand_in, j2k_series, caplog):
    cpu, _ = load_series(j2k_series, decode_processes=0)
    module = stand_in()
    assert gpu_decode.enable("cuda:0") is None
    module.made.batch_error = RuntimeError("nvjpeg2k: out of device memory")
    no_decode_processes(monkeypatch)
    with caplog.at_level(logging.INFO, logger="ainode.run"):
        gpu, _ = load_series(j2k_series)
    assert module.made.batches == [12] and module.made.single == 12
    assert np.array_equal(gpu.pixels, cpu.pixels)
    said = [r.getMessage() for r in caplog.records if "batch" in r.getMessage()]
    assert len(said) == 1 and "12 slices failed" in said[0] and "out of device memory" in said[0]


def test_a_plugin_without_a_decoder_to_batch_for_decodes_slice_by_slice(monkeypatch, stand_in, j2k_series, caplog):
    cpu, _ = load_series(j2k_series, decode_processes=0)
    module = stand_in(batchable=False)
    with caplog.at_level(logging.INFO, logger="ainode.run"):
        assert gpu_decode.enable("cuda:0") is None
    assert any("one call each" in r.getMessage() for r in caplog.records)
    no_decode_processes(monkeypatch)
    gpu, _ = load_series(j2k_series)
    assert module.made.batches == [] and module.made.single == len(j2k_series)
    assert np.array_equal(gpu.pixels, cpu.pixels)


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
    assert RunSection().gpu_decode == "auto"
    assert RunSection(gpu_decode=True).gpu_decode is True
    ds = pydicom.dcmread(j2k_series[0])
    stand_in()
    PluginCache({"ct_lung": PluginSection()}, gpu_decode=True).get("ct_lung")  # ct_lung runs on the CPU
    assert not gpu_decode.takes(ds)
    monkeypatch.setattr(PluginCache, "_device_for", lambda self, plugin: "cuda:0")
    PluginCache({"ct_lung": PluginSection()}, gpu_decode=False).get("ct_lung")  # run.gpu_decode: false
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


def test_auto_uses_the_gpu_where_nvimgcodec_is_installed_and_is_quiet_where_not(monkeypatch, stand_in, j2k_series,
                                                                                  caplog):
    """run.gpu_decode's default: a GPU worker without nvImageCodec is the usual case, not a warning."""
    ds = pydicom.dcmread(j2k_series[0])
    monkeypatch.setattr(PluginCache, "_device_for", lambda self, plugin: "cuda:0")
    monkeypatch.setitem(sys.modules, gpu_decode.NVIMGCODEC_PLUGIN, None)
    cache = PluginCache({"ct_lung": PluginSection()}, gpu_decode="auto")
    with caplog.at_level(logging.INFO, logger="ainode.run"):
        cache.get("ct_lung")
    assert not gpu_decode.takes(ds) and "does not import" in (cache.gpu_decode_off or "")
    said = [r for r in caplog.records if "slices are decoded on the CPU" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO] and "run.gpu_decode is auto" in said[0].getMessage()
    stand_in()
    PluginCache({"ct_lung": PluginSection()}, gpu_decode="auto").get("ct_lung")
    assert gpu_decode.takes(ds)


def test_a_bad_gpu_decode_value_is_refused_by_name(tmp_path):
    from node.config import ConfigError, load_config

    path = tmp_path / "node.yaml"
    path.write_text("run: {gpu_decode: maybe}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "gpu_decode" in str(err.value) and "auto" in str(err.value)


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
        return bytes(b ^ 1 for b in openjpeg.decode(src).tobytes())

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

    assert "run.gpu_decode" not in plan("{gpu_decode: false, gpu: {devices: [0], memory_mb: 8000}}")
    assert ("run.gpu_decode: on, but no plugin runs on a GPU: slices are decoded on the CPU"
            in plan("{gpu_decode: true, gpu: {devices: []}}"))
    assert ("run.gpu_decode: auto, but no plugin runs on a GPU: slices are decoded on the CPU"
            in plan("{gpu: {devices: []}}"))
    monkeypatch.setitem(sys.modules, gpu_decode.NVIMGCODEC_PLUGIN, None)
    assert ("run.gpu_decode: on, but nvImageCodec's pydicom plugin does not import"
            in plan("{gpu_decode: true, gpu: {devices: [0], memory_mb: 8000}}"))
    stand_in()
    assert ("run.gpu_decode: on, GPU workers decode JPEG 2000, HTJ2K and JPEG slices on their GPU"
            in plan("{gpu_decode: true, gpu: {devices: [0], memory_mb: 8000}}"))
    assert ("run.gpu_decode: auto, GPU workers decode JPEG 2000, HTJ2K and JPEG slices on their GPU"
            in plan("{gpu: {devices: [0], memory_mb: 8000}}"))


# What nvImageCodec 0.9 writes to the process's stderr as it loads (from its C++ library, not Python's
# logging), copied from an install with its nvJPEG 2000 wheel missing and without the nvTIFF one.
LIBRARY_OUTPUT = (
    "Failed to load nvjpeg2k library! Please install nvJPEG2000 (see "
    "https://docs.nvidia.com/cuda/nvjpeg2000/userguide.html#installing-nvjpeg2000).\n"
    "Note: If using nvImageCodec's Python distribution, it is enough to install the nvJPEG2000 wheel: e.g. "
    "`python3 -m pip install nvidia-nvjpeg2k-cu13`\n"
    "\x1b[0;31m[ERROR] \x1b[0m[nvjpeg2k_ext] Failed to load nvJPEG2000 library or retrieve version. Decoders and "
    "encoders will not be registered.\n"
    "Failed to load nvtiff library! Please install nvTIFF (see "
    "https://docs.nvidia.com/cuda/nvtiff/userguide.html#installing-nvtiff).\n"
    "Note: If using nvImageCodec's Python distribution, it is enough to install the nvTIFF wheel: e.g. "
    "`python3 -m pip install nvidia-nvtiff-cu13`\n"
    "\x1b[0;31m[ERROR] \x1b[0m[nvtiff_ext] Failed to load nvTIFF library or retrieve version. Decoders and "
    "encoders will not be registered.\n")


def test_nvimagecodecs_own_output_at_load_becomes_one_log_line_per_missing_library(monkeypatch, tmp_path, capfd,
                                                                                   caplog):
    # A module in the plugin's place that writes as the library does, to file descriptor 2, and a line of
    # someone else's (another thread logging meanwhile) that must still reach stderr.
    (tmp_path / "loud_nvimgcodec_plugin.py").write_text(
        "import os\n"
        f"os.write(2, {LIBRARY_OUTPUT.encode()!r})\n"
        "os.write(2, b'ts=... level=INFO logger=ainode.receive msg=another thread\\n')\n"
        "os.write(2, b'\\x1b[0;33m[WARNING] \\x1b[0m[nvjpeg_ext] Hardware decoder not available\\n')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(gpu_decode, "NVIMGCODEC_PLUGIN", "loud_nvimgcodec_plugin")
    monkeypatch.delitem(sys.modules, "loud_nvimgcodec_plugin", raising=False)
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="ainode.run"):
        assert gpu_decode.installed() is None
        assert gpu_decode.installed() is None  # imported once: nothing more is said
    err = capfd.readouterr().err
    assert err == "ts=... level=INFO logger=ainode.receive msg=another thread\n", err
    said = [(r.levelname, r.getMessage()) for r in caplog.records if "nvImageCodec" in r.getMessage()]
    assert len(said) == 3, said
    # Anything else it says is kept, as one clean line.
    assert said[0] == ("WARNING",
                       "GPU decode: nvImageCodec says: [WARNING] [nvjpeg_ext] Hardware decoder not available")
    assert said[1][0] == "WARNING" and "no nvjpeg2k library" in said[1][1] and "JPEG 2000" in said[1][1]
    assert "pip install nvidia-nvjpeg2k-cu12" in said[1][1]
    assert said[2] == ("INFO", "GPU decode: nvImageCodec found no nvtiff library (not used for DICOM slices)")
    sys.modules.pop("loud_nvimgcodec_plugin", None)

    # A load that fails after the library has spoken: both are said.
    (tmp_path / "failing_nvimgcodec_plugin.py").write_text(
        "import os\n"
        f"os.write(2, {LIBRARY_OUTPUT.encode()!r})\n"
        "raise ImportError('libcudart.so.13: cannot open shared object file')\n")
    monkeypatch.setattr(gpu_decode, "NVIMGCODEC_PLUGIN", "failing_nvimgcodec_plugin")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ainode.run"):
        why = gpu_decode.installed()
    assert why is not None and "libcudart.so.13" in why
    assert capfd.readouterr().err == ""
    assert any("no nvjpeg2k library" in r.getMessage() for r in caplog.records)


def test_the_decoders_start_is_logged_the_same_way(monkeypatch, stand_in, capfd, caplog):
    module = stand_in()
    made = module._get_decoder_resources

    def loud() -> object:  # nvImageCodec's Decoder() loads the extensions where the import did not
        os.write(2, LIBRARY_OUTPUT.encode())
        return made()

    module._get_decoder_resources = loud
    capfd.readouterr()
    with caplog.at_level(logging.INFO, logger="ainode.run"):
        assert gpu_decode.enable("cuda:0") is None
    assert capfd.readouterr().err == ""
    assert [r.levelname for r in caplog.records if "nvImageCodec found no" in r.getMessage()] == ["WARNING", "INFO"]
