"""Sizing: worker seconds per study and disk per study for the bundled plugins, scaled to a site's volume.

    .venv/bin/python bench/sizing.py                               # 300-slice 512x512 chest CT, 3 runs
    .venv/bin/python bench/sizing.py --studies-per-day 1400 --retention-hours 168 --device cpu

Writes one synthetic chest CT with `node.synth`, then for each bundled plugin runs the worker's whole job
(`node.run.job_process.execute_job`: read and decode the series, the plugin, SEG/SR build and `dciodvfy`
validation) once to warm up and `--runs` times, in this process, with the SR built in a second process as
a local worker builds it (`run.sr_process`, on with 2 or more cores). Prints the median seconds per study, the
studies per hour one worker slot sustains (3600 / median), the bytes a study puts on the spool (input) and
in the results folder (SEG + SR), and the spool disk a site with `--studies-per-day` holds with
`storage.retention_hours`.

Not included: receive, completion and dispatch (they overlap with other studies' compute; see
e2e_latency.py), and a GPU unless torch sees one (then the plugins that declare a GPU run on cuda:0).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.config.schema import PluginSection, RunSection  # noqa: E402
from node.run.heap import keep_freed_memory  # noqa: E402
from node.results.sr_process import SrProcess  # noqa: E402
from node.run.job_process import JobSpec, PluginCache, execute_job  # noqa: E402
from node.synth import write_chest_ct  # noqa: E402

PLUGINS = ("ct_lung", "ct_nodule")


def _mb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e10 else f"{n / 1e6:,.1f} MB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--studies-per-day", type=float, default=1400,
                    help="default: ~500,000 exams a year, all of them routed to a plugin")
    ap.add_argument("--retention-hours", type=float, default=168, help="storage.retention_hours (default 168)")
    ap.add_argument("--plugins", nargs="+", default=list(PLUGINS))
    a = ap.parse_args(argv)
    validate = shutil.which("dciodvfy") is not None

    with tempfile.TemporaryDirectory(prefix="ainode-sizing-") as tmp:
        tmp_path = Path(tmp)
        r = write_chest_ct(tmp_path / "study", slices=a.slices, slice_thickness=1.0, rows=512, cols=512,
                           pixel_spacing=0.7, seed=4242)
        files = [str(f) for f in r.files]
        input_bytes = sum(Path(f).stat().st_size for f in files)
        series_uid = __import__("pydicom").dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
        print(f"study: {len(files)} slices 512x512, {_mb(input_bytes)} on the spool; dciodvfy: "
              f"{'on' if validate else 'not installed (validation not timed)'}")
        keep_freed_memory()  # as a worker process does (node/run/heap.py)
        cache = PluginCache({p: PluginSection() for p in a.plugins}, None, a.device)
        cache.preload(list(a.plugins))  # as a worker does when it starts
        sr_builder = SrProcess() if RunSection().use_sr_process() else None
        rows = []
        for name in a.plugins:
            out_dir = tmp_path / f"out-{name}"
            out_dir.mkdir()
            times, result_bytes = [], 0
            for i in range(a.runs + 1):  # the first run warms up (model load, allocator, caches)
                spec = JobSpec(job_id=i, study_uid=r.study_uid, plugin=name, series={series_uid: files},
                               temp_dir=str(out_dir), validate=validate)
                t = time.perf_counter()
                out = execute_job(spec, cache, lambda _stage: None, sr_builder=sr_builder)
                if i:
                    times.append(time.perf_counter() - t)
                result_bytes = sum(Path(f.temp_path).stat().st_size for f in out.files)
                for f in out.files:
                    Path(f.temp_path).unlink(missing_ok=True)
            device = cache.get(name).device
            med = statistics.median(times)
            rows.append((name, device, med, 3600 / med, result_bytes, out.timings))
        if sr_builder is not None:
            sr_builder.close()

    print()
    print(f"{'plugin':10} {'device':7} {'s/study':>8} {'studies/h/slot':>15} {'results/study':>14}  split of the last run (s)")
    for name, device, med, per_h, rb, tm in rows:
        split = ", ".join(f"{k.removesuffix('_s')} {tm[k]:.2f}"
                          for k in ("load_s", "plugin_s", "build_s", "validate_s") if k in tm)
        print(f"{name:10} {device:7} {med:8.2f} {per_h:15.0f} {_mb(rb):>14}  {split}")
    per_day = a.studies_per_day
    held_days = a.retention_hours / 24
    results_per_study = sum(r[4] for r in rows)
    print()
    print(f"site: {per_day:,.0f} studies/day, retention {a.retention_hours:g} h")
    print(f"  spool in per day:          {_mb(per_day * input_bytes)}")
    print(f"  results per day (all plugins above): {_mb(per_day * results_per_study)}")
    print(f"  held at steady state:      {_mb(per_day * held_days * (input_bytes + results_per_study))} "
          f"(spool + results, {held_days:g} days)")
    for name, device, med, per_h, _rb, _tm in rows:
        print(f"  {name}: {per_day / per_h / 24:.2f} worker slots busy on average ({device}); "
              f"peak hours need ~3x that")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
