"""Completion to results in the PACS: ct_lung on a 300-slice 512x512 CT, completion by counts (issue 8).

    .venv/bin/python bench/completion_latency.py [--slices 300] [--repeat 3] [--quiet-period 60] [--first-job]
                                                 [--transfer-syntax JPEG2000Lossless] [--pace 30 [--steady]]

A real Orthanc holds a synthetic CT and is, in the node's config, both the queryable source (the node asks
it by C-FIND how many instances the study has, node/assemble/evidence.py) and the destination of the
results. Orthanc pushes the study to the node; the quiet period is long (60 s), so only the counts
complete the study. By default another study of the same size goes through the node first, unmeasured (a
node in service has run jobs before; --first-job measures a fresh node's first job). The stages come from
the node's audit trail and the job's recorded timings; "listed"
is when Orthanc's REST API first shows both the SEG and the SR series. Prints the median of each figure
over --repeat runs, then the targets:
  - completion -> SEG and SR in the PACS, minus the plugin's compute: <= 2 s;
  - the plugin's compute on its own: <= 5 s (CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from push_study import print_table, push_study, ts  # noqa: E402

from node.synth.chest_ct import SUPPORTED_SYNTAXES  # noqa: E402

TARGET_OVERHEAD_S = 2.0
TARGET_PLUGIN_S = 5.0
OVERHEAD = "completion → SEG+SR in PACS, minus plugin compute"
PLUGIN = "plugin compute (ct_lung)"


def one_run(work: Path, slices: int, quiet: float, seed: int, warm_up: bool = True,
            transfer_syntax: str = "ExplicitVRLittleEndian", pace: float | None = None,
            steady: bool = False) -> dict[str, float | None]:
    def config(orthanc) -> dict:
        pacs = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
        return {
            "assemble": {"quiet_period_s": quiet},
            "sources": {"pacs": {**pacs, "query": True}},
            "destinations": {"pacs": pacs},
            "rules": [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung", "destinations": ["pacs"]}],
        }

    run = push_study(work, slices=slices, seed=seed, node_config=config, modalities=("SEG", "SR"), warm_up=warm_up,
                     transfer_syntax=transfer_syntax, pace=pace, steady=steady)
    done = run.first("study-complete")
    if done.get("reason") != "counts-matched":
        raise RuntimeError(f"the study completed by {done.get('reason')!r}, not by counts: check the node's log")
    last_rx = run.last_ts("instance-stored")
    complete = ts(done)
    start = ts(run.first("job-start"))
    end_rec = run.first("job-end")
    end = ts(end_rec)
    sent = run.last_ts("object-sent")
    listed = max(run.listed.values())
    t = end_rec["timings"]
    validate = t.get("validate_s")  # older nodes counted validation in build_s
    worker = (end - start) - sum(t.get(k, 0.0) for k in ("load_s", "prepare_s", "plugin_s", "build_s", "validate_s"))
    return {
        f"{'this script' if steady else 'Orthanc'} → node C-STORE (whole study)": run.t_sent - run.t_send,
        "last instance stored → study-complete (counts)": complete - last_rx,
        "study-complete → job-start (route, queue)": start - complete,
        "slices the worker read (and decoded) while the study arrived": t.get("read_ahead_files", 0),
        "load (read + decode the series)": t["load_s"],
        PLUGIN: t["plugin_s"],
        "build (SEG + SR, written)": t["build_s"] if validate is not None else None,
        "validation (dciodvfy)": validate,
        "build + validation": t["build_s"] + (validate or 0.0),
        "worker hand-off (job time not in the stages above)": worker,
        "job-end → last object sent (dispatch)": sent - end,
        "last object sent → SEG+SR listed in Orthanc": listed - sent,
        "completion → SEG+SR in PACS": listed - complete,
        OVERHEAD: listed - complete - t["plugin_s"],
    }


def pace_label(args: argparse.Namespace) -> str:
    if not args.pace:
        return "pushed at once"
    if args.steady:
        return f"{args.pace:g} instances/s, one at a time over one association"
    return f"{args.pace:g} instances/s, Orthanc pushing a batch a second"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quiet-period", type=float, default=60.0)
    ap.add_argument("--first-job", action="store_true",
                    help="measure a fresh node's first job (no warm-up study before the measured one)")
    ap.add_argument("--transfer-syntax", default="ExplicitVRLittleEndian", choices=sorted(SUPPORTED_SYNTAXES),
                    help="how the CT is encoded, stored in Orthanc and pushed to the node (default uncompressed)")
    ap.add_argument("--pace", type=float, default=None, metavar="PER_S",
                    help="push the measured study at this many instances a second, in one batch each second, "
                         "as a scanner sends (default: all at once, as fast as Orthanc sends)")
    ap.add_argument("--steady", action="store_true",
                    help="with --pace: one instance every 1/PER_S s over one association (sent by this script "
                         "as AE ORTHANC), as a scanner's auto-send does, instead of Orthanc's batch a second")
    args = ap.parse_args()
    if args.steady and not args.pace:
        ap.error("--steady needs --pace PER_S")
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="ainode-bench-") as d:
            runs.append(one_run(Path(d), args.slices, args.quiet_period, seed=i, warm_up=not args.first_job,
                                transfer_syntax=args.transfer_syntax, pace=args.pace, steady=args.steady))
            print(f"run {i + 1}/{args.repeat}: completion → SEG+SR in PACS "
                  f"{runs[-1]['completion → SEG+SR in PACS']:.2f} s", file=sys.stderr)
    which = "a fresh node's first job" if args.first_job else "after one warm-up study"
    print_table(f"Completion → results in PACS, ct_lung, {args.slices}-slice 512x512 CT, completion by counts "
                f"(quiet period {args.quiet_period:g} s), {which}, {args.transfer_syntax}, "
                f"{pace_label(args)}, median of {args.repeat}", runs)
    overhead = statistics.median(r[OVERHEAD] for r in runs)
    plugin = statistics.median(r[PLUGIN] for r in runs)
    print()
    print(f"target: completion → SEG+SR in PACS ≤ {TARGET_OVERHEAD_S:g} s + plugin compute: "
          f"{overhead:.2f} s + plugin → {'met' if overhead <= TARGET_OVERHEAD_S else 'NOT met'}")
    print(f"target: plugin compute ≤ {TARGET_PLUGIN_S:g} s on CPU: "
          f"{plugin:.2f} s → {'met' if plugin <= TARGET_PLUGIN_S else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
