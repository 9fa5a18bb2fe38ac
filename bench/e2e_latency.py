"""Time from the last instance received to the SR stored in the PACS (a real Orthanc), split by stage.

    .venv/bin/python bench/e2e_latency.py [--slices 300] [--repeat 3] [--quiet-period 2]

Stages come from the node's own audit trail (timestamps of instance-stored, study-complete, job-start,
job-end, object-sent) and the job's recorded timings; "in PACS" is when Orthanc lists the SR.
Prints the median of each stage over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from node.synth import write_chest_ct  # noqa: E402
from tests.support.node_proc import NodeProcess  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402


def ts(rec: dict) -> float:
    return datetime.fromisoformat(rec["ts"]).timestamp()


def one_run(work: Path, slices: int, quiet: float, seed: int) -> dict[str, float]:
    synth = write_chest_ct(work / "ct", slices=slices, slice_thickness=1.0 if slices >= 300 else 2.5, seed=seed)
    with OrthancServer(work / "orthanc", aet="ORTHANC") as orthanc:
        orthanc.upload_files(synth.files)
        study_id = orthanc.find_study(synth.study_uid)
        cfg = {
            "assemble": {"quiet_period_s": quiet, "poll_interval_s": 0.1},
            "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}},
            "rules": [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung", "destinations": ["pacs"]}],
        }
        node = NodeProcess(work / "node", cfg).start()
        try:
            orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", node.port)
            t_send = time.time()
            orthanc.send_study_to_modality("ainode", study_id)
            t_sent = time.time()
            deadline = time.monotonic() + 600
            t_in_pacs = None
            while time.monotonic() < deadline:
                mods = [s["MainDicomTags"].get("Modality") for s in orthanc.series_of_study(study_id)]
                if "SR" in mods:
                    t_in_pacs = time.time()
                    break
                time.sleep(0.05)
            if t_in_pacs is None:
                raise RuntimeError(f"no SR in Orthanc after 600 s; node log: {node.log_path}")
            # The PACS can list the SR a moment before the node has written its own 'object-sent' record.
            while time.monotonic() < deadline:
                recs = node.audit_records()
                if any(r["event"] == "object-sent" and r.get("kind") == "SR" for r in recs):
                    break
                time.sleep(0.05)
        finally:
            node.stop()
            node.kill()
    last_rx = max(ts(r) for r in recs if r["event"] == "instance-stored")
    complete = next(ts(r) for r in recs if r["event"] == "study-complete")
    start = next(ts(r) for r in recs if r["event"] == "job-start")
    end_rec = next(r for r in recs if r["event"] == "job-end")
    sent = max(ts(r) for r in recs if r["event"] == "object-sent")
    timings = end_rec["timings"]
    return {
        "send_study_s (Orthanc→node C-STORE)": t_sent - t_send,
        "quiet_period_wait_s": complete - last_rx,
        "route+queue_s": start - complete,
        "load_series_s": timings["load_s"],
        "plugin_s": timings["plugin_s"],
        "build+validate_s": timings["build_s"],
        "dispatch_s (job end→last object sent)": sent - ts(end_rec),
        "last instance → SR in PACS_s": t_in_pacs - last_rx,
        "… minus quiet period_s": (t_in_pacs - last_rx) - (complete - last_rx),
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
    print(f"\nEnd-to-end latency, ct_lung, {args.slices}-slice 512x512 CT, quiet period {args.quiet_period} s, "
          f"median of {args.repeat}")
    print(f"{'stage':45s} {'median s':>9s} {'min':>7s} {'max':>7s}")
    for key in runs[0]:
        vals = [r[key] for r in runs]
        print(f"{key:45s} {statistics.median(vals):9.2f} {min(vals):7.2f} {max(vals):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
