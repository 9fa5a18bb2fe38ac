"""How long stat studies wait behind a routine backlog: a burst of routine studies, then stat ones last.

    .venv/bin/python bench/stat_wait.py [--routine 20] [--stat 2] [--slices 60] [--size 256] [--workers 1]

The node runs ct_lung for both (a rule per calling AE: ROUTINE → routine, STAT → stat) with no
destination, so a job ends when its results are built. All studies are received first and complete
together when the node restarts, so the routine backlog is really there when the stat jobs are queued. Waits come from the node's audit trail:
queue wait = job-start − study-complete, of which the part before the restarted workers took their first
job is their start-up. The bound to check, from the job records: when a stat job is queued at most one
routine job per worker is running, and no routine job starts ahead of it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.synth import write_chest_ct  # noqa: E402
from tests.support.node_proc import NodeProcess  # noqa: E402


def ts(rec: dict) -> float:
    return datetime.fromisoformat(rec["ts"]).timestamp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routine", type=int, default=20)
    ap.add_argument("--stat", type=int, default=2)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--size", type=int, default=256, help="rows = columns of each slice")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="ainode-bench-stat-") as tmp:
        work = Path(tmp)
        studies = []
        for k in range(args.routine + args.stat):
            ct = write_chest_ct(work / f"ct{k}", slices=args.slices, rows=args.size, cols=args.size,
                                pixel_spacing=0.7 * 512 / args.size, seed=k)
            studies.append(("ROUTINE" if k < args.routine else "STAT", ct))
        rules = [{"name": "routine", "study": {"calling_ae": "ROUTINE"}, "plugin": "ct_lung"},
                 {"name": "stat", "study": {"calling_ae": "STAT"}, "plugin": "ct_lung", "priority": "stat"}]
        # Phase 1: receive every study, none completes (a quiet period of an hour); the node stops.
        # Phase 2: restarted with a 1 s quiet period, all studies complete in one tick, in arrival order:
        # a burst of routine jobs with the stat ones last, as after a PACS outage.
        cfg = {"assemble": {"quiet_period_s": 3600}, "run": {"workers": args.workers}, "rules": rules}
        node = NodeProcess(work / "node", cfg, prefault=True).start()
        try:
            t0 = time.time()
            for calling, ct in studies:
                subprocess.run(["storescu", "-aet", calling, "-aec", node.ae_title, "127.0.0.1", str(node.port),
                                *map(str, ct.files)], check=True, capture_output=True, timeout=600)
            t_sent = time.time()
        finally:
            node.stop()
            node.kill()
        cfg["assemble"] = {"quiet_period_s": 1.0, "poll_interval_s": 0.1}
        node = NodeProcess(work / "node", cfg, prefault=True).start()
        try:
            deadline = time.monotonic() + 3600
            while time.monotonic() < deadline:
                recs = node.audit_records()
                if sum(r["event"] == "job-end" for r in recs) == len(studies):
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"jobs did not end within an hour; node log: {node.log_path}")
        finally:
            node.stop()
            node.kill()

    rows = job_rows(recs)
    routine = [x for x in rows if x["rule"] == "routine"]
    med_run = statistics.median(x["run_s"] for x in routine)
    print(f"{args.routine} routine + {args.stat} stat studies ({args.slices}x{args.size}x{args.size}), "
          f"{args.workers} worker(s); received in {t_sent - t0:.1f} s, completed together at restart")
    print(f"routine job run time: median {med_run:.2f} s; routine queue wait: median "
          f"{statistics.median(x['wait_s'] for x in routine):.1f} s, max {max(x['wait_s'] for x in routine):.1f} s")
    checked = stat_order(recs, rows, args.workers)
    for k, x in enumerate(checked, 1):
        print(f"stat study {k}: queue wait {x['wait_s']:.2f} s, of which {x['startup_s']:.2f} s "
              f"before the workers took their first job (start-up after the restart); routine jobs running "
              f"when it was queued {x['running']}, started ahead of it after that {x['overtook']}; result built "
              f"{x['done_after_complete_s']:.2f} s after completion")
    ok = all(x["ok"] for x in checked)
    print(f"bound: a stat job waits for at most one running routine job per worker ({args.workers}) and no "
          f"routine job starts ahead of it: {'met' if ok else 'NOT met'} (median routine job run "
          f"{med_run:.2f} s)")


def job_rows(recs: list[dict]) -> list[dict]:
    """One row per ended job, from the node's audit records: its rule, study, wait and run."""
    complete = {r["study_uid"]: ts(r) for r in recs if r["event"] == "study-complete"}
    start = {r["job_id"]: r for r in recs if r["event"] == "job-start"}
    rows = []
    for r in recs:
        if r["event"] != "job-end":
            continue
        s = start[r["job_id"]]
        rows.append({"rule": s["rule"], "study": r["study_uid"], "job_id": r["job_id"], "start": ts(s), "end": ts(r),
                     "complete": complete[r["study_uid"]], "wait_s": ts(s) - complete[r["study_uid"]],
                     "run_s": ts(r) - ts(s), "done_after_complete_s": ts(r) - complete[r["study_uid"]]})
    return rows


def stat_order(recs: list[dict], rows: list[dict], workers: int) -> list[dict]:
    """Each stat job (in the order its study completed) with the bound checked from the job records: the
    routine jobs running when it was queued (its rule-matched record; at most one per worker) and those
    started after that but before it (none). The restarted node's workers take their first job only once
    started (plugin loaded, memory touched): that part of a wait (`startup_s`) is start-up, not the queue."""
    first_start = min(x["start"] for x in rows)
    matched = {r["job_id"]: ts(r) for r in recs if r["event"] == "rule-matched" and "job_id" in r}  # queued
    routine = [x for x in rows if x["rule"] == "routine"]
    out = []
    for x in sorted((x for x in rows if x["rule"] == "stat"), key=lambda x: x["complete"]):
        queued = matched.get(x["job_id"], x["complete"])
        overtook = sum(queued < r["start"] < x["start"] for r in routine)
        running = sum(r["start"] <= queued < r["end"] for r in routine)
        out.append({**x, "startup_s": max(0.0, first_start - x["complete"]), "overtook": overtook,
                    "running": running, "ok": overtook == 0 and running <= workers})
    return out

if __name__ == "__main__":
    main()
