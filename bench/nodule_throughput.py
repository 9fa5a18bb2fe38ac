"""ct_nodule throughput: seconds per study for a 300-slice 512x512 synthetic chest CT.

    .venv/bin/python bench/nodule_throughput.py                 # CUDA if torch sees a GPU, else CPU
    .venv/bin/python bench/nodule_throughput.py --device cpu --runs 3

Writes the study with `node.synth` (300 slices of 1.0 mm, 512x512 at 0.7 mm), reads it once with the
node's series loader (not timed: that is the node's work, not the plugin's), loads the bundled model
package, runs the plugin once to warm up, then `--runs` times, and prints the median seconds per study with
the split preprocess / inference / postprocess from `PluginResult.timings`.

On CUDA it also samples GPU utilisation every 100 ms during each run (`nvidia-smi -lms 100`, falling back
to `torch.cuda.utilization()`), and prints the mean utilisation during inference and the share of the
study's time the GPU was idle (samples at 0%), plus the peak GPU memory the plugin reports.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.models import load_model  # noqa: E402
from node.plugin_api import StudyInput  # noqa: E402
from node.run.series_loader import load_series  # noqa: E402
from node.synth import write_chest_ct  # noqa: E402
from plugins.ct_nodule import CtNodulePlugin  # noqa: E402


class GpuSampler:
    """GPU utilisation samples (time, percent) every `interval` s while running, in a background thread."""

    def __init__(self, device_index: int, interval: float = 0.1) -> None:
        self.index, self.interval = device_index, interval
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self.source = "nvidia-smi" if shutil.which("nvidia-smi") else "torch.cuda.utilization"

    def _read_smi(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if self._stop.is_set():
                break
            try:
                self.samples.append((time.perf_counter(), float(line.strip())))
            except ValueError:
                continue

    def _poll_torch(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), float(torch.cuda.utilization(self.index))))
            time.sleep(self.interval)

    def __enter__(self) -> "GpuSampler":
        if self.source == "nvidia-smi":
            self._proc = subprocess.Popen(
                ["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", str(int(self.interval * 1000))], stdout=subprocess.PIPE, text=True)
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            self._thread = threading.Thread(target=self._poll_torch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)

    def between(self, t0: float, t1: float) -> list[float]:
        return [u for t, u in self.samples if t0 <= t <= t1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    with tempfile.TemporaryDirectory(prefix="nodule_bench_") as tmp:
        t0 = time.perf_counter()
        r = write_chest_ct(Path(tmp), slices=a.slices, slice_thickness=1.0, rows=512, cols=512, pixel_spacing=0.7,
                           seed=4242)
        vol, _ = load_series(r.files)
        print(f"study: {vol.pixels.shape[0]} x {vol.pixels.shape[1]} x {vol.pixels.shape[2]} voxels, spacing "
              f"{vol.spacing} mm (synth + load {time.perf_counter() - t0:.1f} s, not timed)")

    options = {"batch_size": a.batch_size} if a.batch_size else {}
    plugin = CtNodulePlugin(options)
    plugin.device = a.device
    plugin.load_model(load_model(a.models, "ct_nodule", plugin.model_version))
    cuda = torch.device(a.device).type == "cuda"
    what = torch.cuda.get_device_name(a.device) if cuda else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"device: {a.device} ({what}); torch {torch.__version__}")
    study = StudyInput(r.study_uid, [vol], Path(tempfile.gettempdir()))

    t = time.perf_counter()
    warm = plugin.run(study)
    print(f"warm-up run: {time.perf_counter() - t:.2f} s, {len(warm.findings)} nodule(s) "
          f"(truth: {len(r.truth['nodules'])}, diameters {[n['diameter_mm'] for n in r.truth['nodules']]} mm)")

    rows = []
    sampler = GpuSampler(torch.device(a.device).index or 0) if cuda else None
    if sampler:
        sampler.__enter__()
    try:
        for i in range(a.runs):
            t0 = time.perf_counter()
            res = plugin.run(study)
            t1 = time.perf_counter()
            tm = dict(res.timings)
            row = {"total": t1 - t0, **tm, "batch": plugin.last_batch_size, "peak_mb": res.gpu_memory_peak_mb}
            if sampler:
                time.sleep(0.3)  # let the last samples of the run arrive
                inf0 = t0 + tm["preprocess_s"]
                inf = sampler.between(inf0, inf0 + tm["inference_s"])
                whole = sampler.between(t0, t1)
                row["util_inference"] = statistics.mean(inf) if inf else float("nan")
                row["idle_share"] = sum(u == 0 for u in whole) / len(whole) if whole else float("nan")
                row["samples"] = len(whole)
            rows.append(row)
            extra = ""
            if sampler:
                util = (f"{row['util_inference']:.0f}%" if not math.isnan(row["util_inference"])
                        else "not sampled (shorter than the 100 ms sampling)")
                extra = (f", GPU util during inference {util}, idle {100 * row['idle_share']:.0f}% "
                         f"of the study ({row['samples']} samples), peak {row['peak_mb']:.0f} MB")
            print(f"run {i + 1}: {row['total']:.2f} s (preprocess {tm['preprocess_s']:.2f}, inference "
                  f"{tm['inference_s']:.2f}, postprocess {tm['postprocess_s']:.2f}; batch {row['batch']}){extra}")
    finally:
        if sampler:
            sampler.__exit__(None, None, None)

    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    print(f"\nmedian of {len(rows)}: {med('total'):.2f} s per study = preprocess {med('preprocess_s'):.2f} + "
          f"inference {med('inference_s'):.2f} + postprocess {med('postprocess_s'):.2f} s  [{a.device}]")
    if sampler:
        sampled = [r["util_inference"] for r in rows if not math.isnan(r["util_inference"])]
        util = (f"{statistics.median(sampled):.0f}% (median of {len(sampled)} runs sampled)" if sampled else
                "not sampled: inference is shorter than the 100 ms sampling (bench/gpu_burst.py measures the busy "
                "share over a burst)")
        print(f"GPU utilisation during inference {util}, GPU idle "
              f"{100 * med('idle_share'):.0f}% of the study time; peak GPU memory {med('peak_mb'):.0f} MB "
              f"(declared {plugin.resources.gpu_memory_mb} MB); sampler: {sampler.source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
