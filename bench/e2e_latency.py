"""Time from the last instance received to the SR stored in the PACS (a real Orthanc), split by stage.

    .venv/bin/python bench/e2e_latency.py [--slices 300] [--repeat 3] [--quiet-period 2]

Completion here is by quiet period (the node does not query the sender); see completion_latency.py for
completion by counts. Stages come from the node's own audit trail (timestamps of instance-stored,
study-complete, job-start, job-end, object-sent) and the job's recorded timings; "in PACS" is when
Orthanc lists the SR. Prints the median of each stage over the repeats.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from push_study import print_table, push_study, ts  # noqa: E402


def one_run(work: Path, slices: int, quiet: float, seed: int) -> dict[str, float]:
    def config(orthanc) -> dict:
        return {
            "assemble": {"quiet_period_s": quiet, "poll_interval_s": 0.1},
            "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}},
            "rules": [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung", "destinations": ["pacs"]}],
        }

    run = push_study(work, slices=slices, seed=seed, node_config=config, modalities=("SR",))
    last_rx = run.last_ts("instance-stored")
    complete = ts(run.first("study-complete"))
    start = ts(run.first("job-start"))
    end_rec = run.first("job-end")
    sent = run.last_ts("object-sent")
    timings = end_rec["timings"]
    in_pacs = run.listed["SR"]
    return {
        "send_study_s (Orthanc→node C-STORE)": run.t_sent - run.t_send,
        "quiet_period_wait_s": complete - last_rx,
        "route+queue_s": start - complete,
        "load_series_s": timings["load_s"],
        "plugin_s": timings["plugin_s"],
        "build+validate_s": timings["build_s"] + timings.get("validate_s", 0.0),
        "dispatch_s (job end→last object sent)": sent - ts(end_rec),
        "last instance → SR in PACS_s": in_pacs - last_rx,
        "… minus quiet period_s": (in_pacs - last_rx) - (complete - last_rx),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quiet-period", type=float, default=2.0)
    args = ap.parse_args()
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="ainode-bench-") as d:
            runs.append(one_run(Path(d), args.slices, args.quiet_period, seed=i))
            print(f"run {i + 1}/{args.repeat}: last instance → SR in PACS "
                  f"{runs[-1]['last instance → SR in PACS_s']:.2f} s", file=sys.stderr)
    print_table(f"End-to-end latency, ct_lung, {args.slices}-slice 512x512 CT, quiet period {args.quiet_period} s, "
                f"median of {args.repeat}", runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
