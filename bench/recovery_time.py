"""Recovery after kill -9 with instances in flight: how long until the node takes images again, and what it lost.

    .venv/bin/python bench/recovery_time.py [--instances 1000] [--associations 4] [--repeat 3]

Each run: a fresh node; `--associations` storescu processes send `--instances` CT slices (512x512);
when half are stored the node gets SIGKILL (its whole process group). Then it is started again and
the table shows: seconds from the restart command until it answers C-ECHO, the reconciler's own
time and findings (from the node-start audit record), instances acknowledged before the kill that
the store does not hold (must be 0), and the time to take the whole batch again from the senders
(most instances are then duplicates, answered Success without a second copy).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from receive_rate import Ainode, dcmtk_env, make_ct_series, send  # noqa: E402


def audit(node: Ainode) -> list[dict]:
    path = node.var / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def one_run(files: list[Path], work: Path, associations: int) -> dict:
    node = Ainode(work)
    node.__enter__()
    try:
        groups = [files[i::associations] for i in range(associations)]
        senders = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", node.aet, "127.0.0.1", str(node.port),
                                     *map(str, g)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    env=dcmtk_env()) for g in groups]
        half = len(files) // 2
        while sum(1 for r in audit(node) if r["event"] == "instance-stored") < half:
            time.sleep(0.02)
        os.killpg(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)
        for s in senders:
            s.wait(60)
        acked = {r["sop_instance_uid"] for r in audit(node) if r["event"] == "instance-stored"}

        t0 = time.perf_counter()
        node._start()  # returns once the node answers C-ECHO and its start-up work has settled
        restart_s = node.answered_at - t0  # to the first C-ECHO answered, not to the settling
        start = [r for r in audit(node) if r["event"] == "node-start"][-1]
        con = sqlite3.connect(f"file:{node.var / 'ainode.db'}?mode=ro", uri=True)
        held = {row[0] for row in con.execute("SELECT sop_instance_uid FROM instances")}
        con.close()
        resend_s = send(files, node.aet, node.port, associations, work)
        return {"acked": len(acked), "lost": len(acked - held), "restart_s": restart_s,
                "reconcile_s": start.get("reconcile_s", float("nan")), "reconciled": start.get("reconciled") or {},
                "resend_s": resend_s}
    finally:
        node.__exit__(None, None, None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ainode-bench-recovery-") as tmp:
        files = make_ct_series(Path(tmp) / "ct", args.instances)
        runs = [one_run(files, Path(tmp) / f"run{i}", args.associations) for i in range(args.repeat)]
    print(f"kill -9 with {args.instances} instances in flight over {args.associations} associations, "
          f"{args.repeat} runs")
    print(f"{'run':>4} {'acked before kill':>18} {'lost':>5} {'restart→C-ECHO s':>17} {'reconcile s':>12} "
          f"{'resend all s':>13}  reconciled")
    for i, r in enumerate(runs, 1):
        print(f"{i:>4} {r['acked']:>18} {r['lost']:>5} {r['restart_s']:>17.2f} {r['reconcile_s']:>12.3f} "
              f"{r['resend_s']:>13.2f}  {r['reconciled']}")
    med = {k: statistics.median(r[k] for r in runs) for k in ("restart_s", "reconcile_s", "resend_s")}
    print(f"median: restart→C-ECHO {med['restart_s']:.2f} s, reconcile {med['reconcile_s']:.3f} s, "
          f"resend {med['resend_s']:.2f} s; lost {sum(r['lost'] for r in runs)}")
    return 1 if any(r["lost"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
