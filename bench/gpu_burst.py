"""ct_nodule burst: how busy the GPU is while worker slots run 20 studies, and decode vs inference time.

    .venv/bin/python bench/gpu_burst.py                       # 20 studies, the node's slots, CUDA if present
    .venv/bin/python bench/gpu_burst.py --studies 6 --workers 1 --device cpu
    .venv/bin/python bench/gpu_burst.py --transfer-syntax JPEG2000Lossless [--gpu-decode]
    .venv/bin/python bench/gpu_burst.py --studies 10 --workers 1 --stand-in-inference 0.07   # without a GPU

Each worker slot is a process doing what a node worker does (node.run.job_process.execute_job with the
Prefetcher: the next study's series is decoded while the current one runs; the results are built and
validated with dciodvfy). The studies are one synthetic 300-slice 512x512 CT run N times (decode work is
the same for every copy). The GPU is sampled every 100 ms over the whole burst (nvidia-smi, else
torch.cuda.utilization). Prints: studies/s, the GPU's busy share (samples above 0%) and mean utilisation,
and where the slots' time went: decode (series read) vs inference vs the rest (pre/postprocess, results
build, validation), plus how long inference waited for a decode that was not ready; then each stage's median
per job, and the CPU time a job took in its slot process.

Without a GPU it runs on CPU and prints the same split (no utilisation). `--transfer-syntax JPEG2000Lossless`
writes the CT compressed, so decoding costs what it does for a PACS that sends JPEG 2000; `--gpu-decode` has
the slots decode it on the GPU as run.gpu_decode does (node/run/gpu_decode.py, nvImageCodec); the header line
says which decoder the slots used, and why not the GPU when they could not.

`--stand-in-inference SECONDS` replaces the model by a wait of that long (after one real inference, whose
probability map each study then gets): the CPU is as free as while a GPU runs the model. The slots take
turns at the wait (a lock), as one GPU runs one study's model at full speed at a time. It prints the share of
the burst in which the stand-in ran: how busy this machine's CPU side could keep a GPU that infers a study in
SECONDS (0.07 for ct_nodule on an H100), measured without one.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _stand_in_inference(seconds: float, turn: "mp.synchronize.Lock") -> None:
    """ct_nodule's inference in this process replaced by a wait of `seconds` that returns the real
    probability map (computed at the first call, the warm-up): the CPU is as free as while a GPU runs the
    model, so the burst shows how busy this machine's CPU side would keep a GPU that infers in `seconds`.
    `turn`, shared by the slots, lets one wait run at a time, as one GPU runs one study's model at a time
    at full speed."""
    from plugins.ct_nodule import infer

    real, made = infer.predict_volume, {}

    def predict(net, image, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = tuple(image.shape)
        if key not in made:
            made[key] = real(net, image, *args, **kwargs)
        else:
            with turn:
                start = time.monotonic()
                time.sleep(seconds)
                STAND_IN_SPANS.append((start, time.monotonic()))
        return made[key].clone()

    infer.predict_volume = predict


STAND_IN_SPANS: list[tuple[float, float]] = []  # (start, end) of each stand-in inference in this slot process


def _covered(spans: list[tuple[float, float]]) -> float:
    """Seconds in which at least one of `spans` runs (a GPU is busy while any slot's work is on it)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


# The job's own timings (node.run.job_process) printed as medians per job: where a slot's time goes.
STAGES = {"load_s": "series read", "prepare_s": "prepare", "inference_s": "inference", "postprocess_s": "postprocess",
          "build_s": "build (SEG, and waiting for the SR)", "validate_s": "validate (beyond the build)"}


def _cpu_s() -> float:
    """CPU seconds of this slot process so far, all its threads (the prefetch's too)."""
    import resource

    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def slot(jobs: list[int], files: list[str], series_uid: str, study_uid: str, out_dir: str, device: str,
         validate: bool, gpu_decode: bool, go: "mp.synchronize.Event", results: "mp.Queue",
         stand_in: float = 0.0, turn: "mp.synchronize.Lock | None" = None, prefetching: bool = True) -> None:
    from node.lifeline import die_with_parent

    # A burst stopped by gpu_check.sh's `timeout` (SIGTERM to this bench alone) or killed left its slots
    # waiting for `go` for good, holding their models (GPU memory on a GPU) under the benches after it.
    die_with_parent()
    from node.config.schema import PluginSection, RunSection
    from node.results.sr_process import SrProcess
    from node.run import gpu_decode as gpu_decoder
    from node.run.heap import keep_freed_memory
    from node.run.job_process import JobSpec, PluginCache, execute_job
    from node.run.prefetch import Prefetcher

    # As a node worker does (plugin_process._child_main): each study's volume and masks reuse the pages the
    # last one freed, instead of new pages the kernel faults in and zeroes (node/run/heap.py); and with run.
    # sr_process's default (on with 2 or more CPUs) the SR is built in a second process beside the SEG.
    keep_freed_memory()
    sr_builder = SrProcess() if RunSection().use_sr_process() else None

    cache = PluginCache({"ct_nodule": PluginSection()}, ROOT / "models", device, gpu_decode)
    plugin = cache.get("ct_nodule")  # load the model before the burst starts, as a warm worker has
    on_gpu = gpu_decoder.active()
    why = "" if on_gpu or not gpu_decode else cache.gpu_decode_off or f"the plugin runs on {plugin.device}"
    prefetch = Prefetcher(cache)

    def spec(job_id: int) -> JobSpec:
        return JobSpec(job_id=job_id, study_uid=study_uid, plugin="ct_nodule", series={series_uid: files},
                       temp_dir=out_dir, validate=validate)

    if stand_in and turn is not None:
        _stand_in_inference(stand_in, turn)
        # The real inference, once, under a job id of this process's own: result temp files are named by
        # job id and UID, the UIDs come from the study, and two slots warming up with one id wrote the same
        # SEG file at once (dciodvfy: "Tags out of order").
        for f in execute_job(spec(-os.getpid()), cache, lambda _stage: None, sr_builder=sr_builder).files:
            Path(f.temp_path).unlink(missing_ok=True)
    results.put({"ready": True})
    go.wait()
    for i, job_id in enumerate(jobs):
        cpu0 = _cpu_s()
        t = time.perf_counter()
        loaded = prefetch.take(spec(job_id))
        waited = time.perf_counter() - t  # inference waiting for a decode that was not finished
        if i + 1 < len(jobs) and prefetching:
            prefetch.start(spec(jobs[i + 1]))
        t0 = time.perf_counter()
        out = execute_job(spec(job_id), cache, lambda _stage: None, loaded, sr_builder)
        for f in out.files:
            Path(f.temp_path).unlink(missing_ok=True)
        load_s = loaded.timings.get("load_s", 0.0) if loaded else out.timings.get("load_s", 0.0)
        results.put({"job": job_id, "wall": time.perf_counter() - t0 + waited, "load_s": load_s,
                     "waited_s": waited if loaded else out.timings.get("load_s", 0.0),
                     "inference_s": out.timings.get("inference_s", 0.0), "plugin_s": out.timings.get("plugin_s", 0.0),
                     "build_s": out.timings.get("build_s", 0.0), "validate_s": out.timings.get("validate_s", 0.0),
                     "gpu_decode": on_gpu, "why": why, "spans": STAND_IN_SPANS[:],
                     "stages": {k: float(v) for k, v in out.timings.items() if k in STAGES},
                     "cpu_s": _cpu_s() - cpu0})
        STAND_IN_SPANS.clear()
    if sr_builder is not None:
        sr_builder.close(wait=True)


def _get(results: "mp.Queue", procs: list) -> dict:
    """The next message, or SystemExit once a slot has died (a slot that cannot load the plugin would
    otherwise leave the burst waiting until its time limit)."""
    import queue

    while True:
        try:
            return results.get(timeout=1)
        except queue.Empty:
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise SystemExit(f"gpu_burst: a worker slot exited with code {dead[0]}; its traceback is above")


def _slots(workers: int | str, device: str) -> tuple[int, str]:
    """--workers, or for auto the node's run.gpu.slots_per_gpu: auto for one GPU (its total memory less the
    default reserve as the budget) beside the default one CPU worker."""
    if workers != "auto":
        return int(workers), "--workers"
    import torch

    from node.config.schema import GpuSection
    from node.run.slots import plugin_needs, slots_per_gpu

    budgets = []
    if device.startswith("cuda"):
        total_mb = torch.cuda.get_device_properties(torch.device(device)).total_memory // 2**20
        budgets = [total_mb - GpuSection().reserve_mb]
    count = slots_per_gpu("auto", budgets, plugin_needs(["ct_nodule"], {}), cpu_workers=1)
    return count.per_gpu, count.why


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench.nodule_throughput import GpuSampler
    from node.cpus import THREADS_ENV, worker_thread_env
    from node.synth import write_chest_ct

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--workers", type=lambda v: v if v == "auto" else int(v), default="auto",
                    help="worker slots (processes) sharing the device; auto (default): as many as the node's "
                         "run.gpu.slots_per_gpu: auto gives this machine")
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--transfer-syntax", default="ExplicitVRLittleEndian", help="e.g. JPEG2000Lossless")
    ap.add_argument("--gpu-decode", action="store_true", help="decode on the GPU, as run.gpu_decode: true")
    ap.add_argument("--stand-in-inference", type=float, default=0.0, metavar="SECONDS",
                    help="replace the model by a wait of SECONDS a study (0.07: the H100's) and report the share "
                         "of the burst it takes: the GPU-busy figure this machine's CPU side allows")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="each slot reads its next series only when the job starts (as a node worker does with "
                         "nothing queued): shows what the prefetch's overlap costs the running job's stages")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.workers, why_workers = _slots(a.workers, a.device)
    validate = shutil.which("dciodvfy") is not None
    with tempfile.TemporaryDirectory(prefix="ainode-gpu-burst-") as tmp:
        r = write_chest_ct(Path(tmp) / "ct", slices=a.slices, slice_thickness=1.0, rows=512, cols=512,
                           pixel_spacing=0.7, seed=4242, transfer_syntax=a.transfer_syntax)
        files = [str(f) for f in r.files]
        series_uid = str(__import__("pydicom").dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        ctx = mp.get_context("spawn")  # as the node starts its workers (CUDA needs spawn)
        # Each slot's share of the CPUs as torch threads, as the node gives its workers (node/cpus.py); an
        # OMP_NUM_THREADS set in this environment is kept. The spawned slots inherit it.
        threads = worker_thread_env(a.workers)
        os.environ.update(threads)
        go, results, turn = ctx.Event(), ctx.Queue(), ctx.Lock()
        procs = [ctx.Process(target=slot, args=(list(range(w, a.studies, a.workers)), files, series_uid,
                                               r.study_uid, tmp, a.device, validate, a.gpu_decode, go,
                                               results, a.stand_in_inference, turn, not a.no_prefetch))
                 for w in range(a.workers)]
        for p in procs:
            p.start()
        for _ in procs:
            _get(results, procs)  # every slot has its model loaded
        sampler = GpuSampler(torch.device(a.device).index or 0) if cuda else None
        if sampler:
            sampler.__enter__()
        t0 = time.perf_counter()
        go.set()
        rows = [_get(results, procs) for _ in range(a.studies)]
        t1 = time.perf_counter()
        if sampler:
            sampler.__exit__(None, None, None)
        for p in procs:
            p.join(60)

    wall = t1 - t0
    total = lambda k: sum(row[k] for row in rows)  # noqa: E731
    slot_time = total("wall")
    rest = slot_time - total("waited_s") - total("inference_s")
    print(f"ct_nodule burst: {a.studies} studies of {a.slices}x512x512, {a.workers} worker slot(s) ({why_workers}) "
          f"on {a.device}, {'no prefetch (--no-prefetch), ' if a.no_prefetch else ''}"
          f"dciodvfy {'on' if validate else 'off'}, OMP_NUM_THREADS={os.environ.get(THREADS_ENV)}"
          f"{'' if threads else ' (set in the environment)'}")
    decoders = {"GPU (nvImageCodec)" if row["gpu_decode"] else "CPU" for row in rows}
    why = next((row["why"] for row in rows if row["why"]), "")
    print(f"{a.transfer_syntax}, slices decoded on the {' and '.join(sorted(decoders))}"
          f"{f' (--gpu-decode: {why})' if why else ''}")
    print(f"burst {wall:.1f} s = {a.studies / wall:.2f} studies/s; median job {statistics.median(r['wall'] for r in rows):.2f} s")
    if sampler:
        s = sampler.between(t0, t1)
        busy = sum(u > 0 for u in s) / len(s) if s else float("nan")
        print(f"GPU busy {100 * busy:.0f}% of the burst (samples above 0%), mean utilisation "
              f"{statistics.mean(s) if s else float('nan'):.0f}% ({len(s)} samples, {sampler.source}); target >= 80%")
    elif not a.stand_in_inference:
        print("GPU: none (CPU run; no utilisation figure)")
    if a.stand_in_inference:
        covered = _covered([span for row in rows for span in row["spans"]])
        print(f"stand-in inference ({a.stand_in_inference:g} s a study, no model run, one at a time): running "
              f"{100 * covered / wall:.0f}% of the burst; target >= 80% (the busy share this machine's CPU side "
              f"allows a GPU that infers a study in {a.stand_in_inference:g} s)")
    print(f"decode (series read) {total('load_s'):.1f} s of slot time, done ahead by prefetch except "
          f"{total('waited_s'):.1f} s that inference waited for")
    print(f"slot time {slot_time:.1f} s: inference {100 * total('inference_s') / slot_time:.0f}%, waiting for decode "
          f"{100 * total('waited_s') / slot_time:.0f}%, rest (pre/postprocess, build {total('build_s'):.1f} s, "
          f"validate {total('validate_s'):.1f} s) {100 * rest / slot_time:.0f}%")
    medians = ", ".join(f"{label} {statistics.median(r['stages'].get(k, 0.0) for r in rows):.3f}"
                        for k, label in STAGES.items())
    print(f"median per job (s): {medians}; waited for the prefetch "
          f"{statistics.median(r['waited_s'] for r in rows):.3f}; CPU of the slot process "
          f"{statistics.median(r['cpu_s'] for r in rows):.2f} "
          "(its threads; the SR process, dciodvfy and decoders apart)")
    print(f"decode vs inference: {total('load_s'):.1f} s vs {total('inference_s'):.1f} s "
          f"({100 * total('load_s') / max(total('load_s') + total('inference_s'), 1e-9):.0f}% decode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
