"""bench/gpu_decode.py: the codestreams it hands nvImageCodec, and its CPU figures on a machine without a GPU
(bench/device/gpu_check.sh runs it where there is one)."""

from __future__ import annotations

import numpy as np
import pydicom
import torch

from bench.gpu_decode import codestreams, main
from node.synth import write_chest_ct


def test_codestreams_decode_to_the_stored_values(tmp_path):
    import openjpeg

    files = sorted(write_chest_ct(tmp_path, slices=10, rows=64, cols=64, transfer_syntax="JPEG2000Lossless").files)
    streams, dtype = codestreams(files)
    assert len(streams) == 10 and dtype == np.int16
    for f, s in zip(files, streams):
        assert np.array_equal(openjpeg.decode(s).view(dtype), pydicom.dcmread(f).pixel_array)


def test_without_a_gpu_it_prints_the_cpu_figures_and_says_why_not_the_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--slices", "10", "--repeat", "1", "--processes", "2"]) == 0
    out = capsys.readouterr().out
    assert "CPU, the node now: decode_files, 2 process(es)" in out
    assert "GPU (nvImageCodec): not measured: torch sees no CUDA device" in out


class _FakeImage:
    """What nvImageCodec hands back: an image that `cpu()` copies to host memory, (rows, columns, 1) uint16."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def cpu(self) -> np.ndarray:
        return self.values.view(np.uint16)[..., None]


def test_the_gpu_path_compares_every_slice_with_the_cpu_decode(monkeypatch, capsys):
    """nvImageCodec cannot run here (no GPU): a stand-in decodes with openjpeg, as nvjpeg2k would on a GPU, so
    that the batch call, the copy to host and the value check are what gpu_check.sh will run there."""
    import openjpeg

    import bench.gpu_decode as bench

    class Decoder:
        def __init__(self, corrupt: bool) -> None:
            self.corrupt = corrupt

        def decode(self, streams, params):
            images = [_FakeImage(openjpeg.decode(s)) for s in streams]
            if self.corrupt:
                images[-1].values = images[-1].values + 1
            return images

    class Codec:
        __version__ = "0.9.0"

        class ColorSpec:
            UNCHANGED = "unchanged"

        @staticmethod
        def DecodeParams(**kwargs):
            return kwargs

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "stand-in GPU")
    for corrupt, rc, verdict in ((False, 0, "identical to"), (True, 1, "DIFFER from")):
        monkeypatch.setattr(bench, "gpu_decoder", lambda c=corrupt: (Codec, Decoder(c), ""))
        assert bench.main(["--slices", "10", "--repeat", "1", "--processes", "1"]) == rc
        out = capsys.readouterr().out
        assert "GPU, nvImageCodec, one batch, to host memory" in out
        assert f"values {verdict} the CPU decode" in out

    class Undecodable(Decoder):  # nvImageCodec hands back None for a codestream it cannot decode
        def decode(self, streams, params):
            return [*super().decode(streams, params)[:-1], None]

    monkeypatch.setattr(bench, "gpu_decoder", lambda: (Codec, Undecodable(False), ""))
    assert bench.main(["--slices", "10", "--repeat", "1", "--processes", "1"]) == 1
    assert "GPU (nvImageCodec 0.9.0): 1 of 10 slices not decoded" in capsys.readouterr().out
