"""Throughput of a 10-study burst: the local executor vs Ray (run.executor: ray) with 1 and 2 worker processes.

    .venv/bin/python bench/ray_burst.py [--studies 10] [--slices 60] [--size 256] [--repeat 3]

Each run starts a fresh Orthanc and node (ct_lung on every CT, results C-STOREd to Orthanc) and, for
Ray, a local cluster (`ray start --head` on loopback with --num-cpus = the worker processes; the node
runs as many actors: run.workers). The studies are received first and declared complete together
once the workers are warm (see one_run), then the run waits until every job is dispatched. From the audit trail:
  run_s        first job-start → last job-end (the run stage's wall time for the burst)
  e2e_s        studies complete → last object sent to Orthanc
  studies/s    studies / run_s
  job_s        median job total_s (the worker's time per job, as in the job's timings)
  ray_s        median ray_overhead_s of the jobs (ship input, Ray scheduling/transfer, stage files, write results)
Each figure is the median over --repeat runs. Ray's overhead per job is also shown as the difference of
the median job_s from the local executor's with the same number of worker processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

os.environ.setdefault("TCP_NODELAY", "1")  # Debian's DCMTK: else Nagle costs ~40 ms per C-STORE on loopback
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.synth import write_chest_ct  # noqa: E402
from node.store import Store  # noqa: E402
from tests.support.node_proc import NodeProcess  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402
from tests.support.ray_cluster import RayCluster  # noqa: E402


def ts(rec: dict) -> float:
    return datetime.fromisoformat(rec["ts"]).timestamp()


WARMUP_S = 5  # seconds for a started node's workers to load their plugins


def one_run(work: Path, studies: list, executor: str, workers: int) -> dict:
    """Phase 1: a node receives every study, none completes (an hour's quiet period), and stops. Phase 2:
    the node restarts with the executor under test; once its workers are warm, every study is declared
    complete at once (as `ainode complete` does), so the jobs are queued together: a real burst."""
    with OrthancServer(work / "orthanc", aet="ORTHANC") as pacs:
        cluster = RayCluster(num_cpus=workers).start() if executor == "ray" else None
        try:
            cfg: dict = {
                "assemble": {"quiet_period_s": 3600, "poll_interval_s": 0.2},
                "destinations": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
                "rules": [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung",
                           "destinations": ["pacs"]}],
            }
            with NodeProcess(work / "node", cfg, prefault=True) as node:
                files = [str(f) for s in studies for f in s.files]
                subprocess.run(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), *files],
                               check=True, capture_output=True, timeout=600)
            cfg["run"] = {"workers": workers}
            if cluster is not None:
                cfg["run"].update(executor="ray", ray={"address": cluster.address, "namespace": "bench"})
            node = NodeProcess(work / "node", cfg, prefault=True)
            with node:
                deadline = time.monotonic() + 120
                while executor == "ray" and node.log_path.read_text().count("Ray actor ready") < workers:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"Ray actors not ready; node log: {node.log_path}")
                    time.sleep(0.2)
                time.sleep(WARMUP_S)  # local workers (and Ray actors) load their plugins
                store = Store(f"sqlite:///{node.var / 'ainode.db'}")
                for s in studies:
                    store.add_request("complete", study_uid=s.study_uid, requested_by="bench")
                store.close()
                deadline = time.monotonic() + 600
                while True:
                    recs = node.audit_records()
                    sent = [r for r in recs if r["event"] == "object-sent"]
                    ends = [r for r in recs if r["event"] == "job-end"]
                    if len(sent) >= 2 * len(studies) and len(ends) == len(studies):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"burst did not finish in 600 s; node log: {node.log_path}")
                    time.sleep(0.2)
        finally:
            if cluster is not None:
                cluster.stop()
    if any(e.get("outcome") == "failure" for e in ends):
        raise RuntimeError(f"a job failed: {[e.get('error') for e in ends if e.get('outcome') == 'failure']}")
    starts = [ts(r) for r in recs if r["event"] == "job-start"]
    complete = [ts(r) for r in recs if r["event"] == "study-complete"]
    run_s = max(map(ts, ends)) - min(starts)
    return {"run_s": run_s, "e2e_s": max(map(ts, sent)) - min(complete), "rate": len(studies) / run_s,
            "job_s": statistics.median(e["timings"]["total_s"] for e in ends),
            "ray_s": statistics.median(e["timings"]["ray_overhead_s"] for e in ends) if executor == "ray" else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=10)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--size", type=int, default=256, help="rows = columns of each slice")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    modes = [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]
    with tempfile.TemporaryDirectory(prefix="ainode-bench-ray-") as tmp:
        work = Path(tmp)
        studies = [write_chest_ct(work / f"ct{k}", slices=args.slices, rows=args.size, cols=args.size,
                                  pixel_spacing=0.7 * 512 / args.size, slice_thickness=300 / args.slices, seed=k)
                   for k in range(args.studies)]
        results: dict = {m: [] for m in modes}
        for r in range(args.repeat):
            for executor, workers in modes:  # interleaved, so a noisy minute hits every mode alike
                out = one_run(work / f"run-{r}-{executor}-{workers}", studies, executor, workers)
                results[(executor, workers)].append(out)
                print(f"  run {r + 1} {executor} x{workers}: " + " ".join(
                    f"{k}={v:.3f}" for k, v in out.items() if v is not None), flush=True)

    def med(mode, key):  # type: ignore[no-untyped-def]
        return statistics.median(x[key] for x in results[mode])

    print(f"\n{args.studies}-study burst, {args.slices} slices of {args.size}x{args.size}, ct_lung into Orthanc; "
          f"median of {args.repeat} runs")
    print(f"{'executor':<10}{'workers':>8}{'studies/s':>11}{'run_s':>8}{'e2e_s':>8}{'job_s':>8}{'ray_s':>8}"
          f"{'job_s - local':>15}")
    for mode in modes:
        executor, workers = mode
        ray_s = f"{med(mode, 'ray_s'):8.3f}" if executor == "ray" else f"{'-':>8}"
        diff = (f"{med(mode, 'job_s') - med(('local', workers), 'job_s'):+15.3f}" if executor == "ray"
                else f"{'-':>15}")
        print(f"{executor:<10}{workers:>8}{med(mode, 'rate'):>11.2f}{med(mode, 'run_s'):>8.2f}"
              f"{med(mode, 'e2e_s'):>8.2f}{med(mode, 'job_s'):>8.3f}{ray_s}{diff}")


if __name__ == "__main__":
    main()
