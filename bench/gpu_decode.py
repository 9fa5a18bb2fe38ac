"""JPEG 2000 series decode on the CPU (the node's decode processes) against the GPU (NVIDIA nvImageCodec).

    .venv/bin/python bench/gpu_decode.py [--slices 300] [--repeat 3] [--processes N]

Issue 8 asks for GPU-side decode where decoding is the bottleneck. A JPEG 2000 CT pushed all at once is
bound by its decode on 2 cores (about 18 ms of CPU per 512x512 slice, README "Performance"); this says
what nvImageCodec would make of the same series before anything is built on it. It writes the project's
synthetic chest CT as JPEG 2000 Lossless, takes each file's codestream, and times:
  - `decode_files` (node/run/decode_pool.py): what a job does now, `--processes` processes (default: the
    node's choice for this machine);
  - one CPU process decoding with pylibjpeg-openjpeg (pydicom's plugin), for the per-slice CPU cost;
  - nvImageCodec (`nvidia.nvimgcodec`, with the nvjpeg2k extension), when it imports and torch sees a GPU:
    every codestream in one batch call, to GPU memory (what a GPU plugin would take) and on to host memory
    (what the node's volume is now); every slice compared value for value with the CPU decode;
  - the node's own GPU path, run.gpu_decode (node/run/gpu_decode.py: nvImageCodec's pydicom plugin, one
    slice at a time in the job's process): `load_series` of the series, its volume compared with the CPU one.
Prints the median of --repeat runs of each. Without a GPU or nvImageCodec it says why and prints the CPU
figures (bench/device/gpu_check.sh runs it on a GPU machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def codestreams(paths: list[Path]) -> tuple[list[bytes], np.dtype]:
    """Each single-frame file's JPEG 2000 codestream, and the dtype its stored values have."""
    import pydicom
    from pydicom.encaps import generate_frames

    out, dtype = [], None
    for p in paths:
        ds = pydicom.dcmread(p)
        out.append(next(generate_frames(ds.PixelData, number_of_frames=1)))
        dtype = dtype or np.dtype(f"{'i' if ds.PixelRepresentation else 'u'}{ds.BitsAllocated // 8}")
    return out, np.dtype(dtype)


def row(label: str, series_s: float | None, per_slice_s: float) -> None:
    series = f"{series_s:9.2f}" if series_s is not None else " " * 9
    print(f"{label:58s} {series} {per_slice_s * 1000:9.1f}")


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds of `repeat` calls after one warm-up call, and the last call's result."""
    result = fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def gpu_decoder() -> tuple[Any, Any, str]:
    """(nvimgcodec module, decoder, "") or (None, None, why not)."""
    try:
        import torch
    except ImportError:
        return None, None, "torch is not installed"
    if not torch.cuda.is_available():
        return None, None, "torch sees no CUDA device"
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        return None, None, f"nvImageCodec does not import ({exc}); bench/device/fetch_wheels.sh --nvimgcodec"
    try:
        return nvimgcodec, nvimgcodec.Decoder(), ""
    except Exception as exc:  # noqa: BLE001 - a missing extension or driver: reported, the CPU figures stand
        return None, None, f"nvImageCodec decoder not created: {type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    from node.run.decode_pool import decode_files, processes_for
    from node.synth import write_chest_ct

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--processes", type=int, default=None, help="decode processes (default: the node's choice)")
    a = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ainode-gpu-decode-") as tmp:
        r = write_chest_ct(Path(tmp) / "ct", slices=a.slices, slice_thickness=1.0, rows=512, cols=512,
                           pixel_spacing=0.7, seed=4242, transfer_syntax="JPEG2000Lossless")
        files = sorted(r.files)
        streams, dtype = codestreams(files)
        n = a.processes or processes_for(len(files))
        pool_s, volume = timed(lambda: decode_files([str(f) for f in files], processes=n), a.repeat)
        import openjpeg

        some = streams[:30]
        one_s, _ = timed(lambda: [openjpeg.decode(s) for s in some], a.repeat)
        cpu = np.stack(volume)
        mb = sum(map(len, streams)) / 2**20
        print(f"JPEG 2000 Lossless, {len(streams)} slices of 512x512 {dtype}, {mb:.0f} MB of codestreams, "
              f"median of {a.repeat}")
        print(f"{'decoder':58s} {'series s':>9s} {'ms/slice':>9s}")
        row("CPU, one process (pylibjpeg-openjpeg), per slice", None, one_s / len(some))
        row(f"CPU, the node now: decode_files, {n} process(es)", pool_s, pool_s / len(streams))
        node_rc = node_gpu_decode([str(f) for f in files], a.repeat)

    nvimgcodec, decoder, why = gpu_decoder()
    if decoder is None:
        print(f"GPU (nvImageCodec): not measured: {why}")
        return node_rc
    import torch

    params = nvimgcodec.DecodeParams(allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED)

    def to_gpu() -> list[Any]:
        images = decoder.decode(streams, params=params)
        torch.cuda.synchronize()
        return images

    def to_host() -> np.ndarray:
        images = decoder.decode(streams, params=params)
        return np.stack([np.asarray(im.cpu()).reshape(cpu.shape[1:]).view(dtype) for im in images])

    version = getattr(nvimgcodec, "__version__", "?")
    try:
        gpu_s, images = timed(to_gpu, a.repeat)
        if failed := sum(im is None for im in images):  # nvImageCodec gives None for a stream it cannot decode
            print(f"GPU (nvImageCodec {version}): {failed} of {len(streams)} slices not decoded")
            return 1
        host_s, gpu_volume = timed(to_host, a.repeat)
    except Exception as exc:  # noqa: BLE001 - a missing extension library, an API change: said, CPU figures stand
        print(f"GPU (nvImageCodec {version}): decode failed: {type(exc).__name__}: {exc}")
        return 1
    same = np.array_equal(gpu_volume, cpu)
    row("GPU, nvImageCodec, one batch, to GPU memory", gpu_s, gpu_s / len(streams))
    row("GPU, nvImageCodec, one batch, to host memory", host_s, host_s / len(streams))
    print(f"GPU: {torch.cuda.get_device_name()}; values {'identical to' if same else 'DIFFER from'} the CPU "
          f"decode; node now / GPU to host = {pool_s / host_s:.1f}x")
    return node_rc if same else 1


def node_gpu_decode(files: list[str], repeat: int) -> int:
    """Time load_series with run.gpu_decode against the CPU decode processes; 1 if the volumes differ."""
    import torch

    from node.run import gpu_decode
    from node.run.series_loader import load_series

    why = gpu_decode.enable("cuda:0") if torch.cuda.is_available() else "torch sees no CUDA device"
    if why:
        print(f"GPU, run.gpu_decode: not measured: {why}")
        return 0
    try:
        gpu_s, (gpu, _) = timed(lambda: load_series(files), repeat)
    finally:
        gpu_decode.disable()
    cpu_s, (cpu, _) = timed(lambda: load_series(files), repeat)
    same = np.array_equal(gpu.pixels, cpu.pixels)
    row("CPU, the node's load_series (headers, decode, volume)", cpu_s, cpu_s / len(files))
    row("GPU, the node's load_series with run.gpu_decode", gpu_s, gpu_s / len(files))
    print(f"run.gpu_decode: volume {'identical to' if same else 'DIFFERS from'} the CPU one; "
          f"CPU / GPU = {cpu_s / gpu_s:.1f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
