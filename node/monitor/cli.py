"""`ainode monitor` and `ainode feedback`: drift, shadow agreement and feedback, read from the store."""

from __future__ import annotations

import json
import sys
from typing import Any

from node.monitor.drift import drift_report
from node.monitor.records import FeedbackError, feedback_report, job_findings, record_feedback, shadow_report
from node.store import Store


def _table(rows: list[dict], cols: list[str]) -> str:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def monitor_report(store: Store, cfg: Any) -> dict:
    """Everything `ainode monitor` prints, as data (the API can serve the same)."""
    drift = [d.as_dict() for d in drift_report(store, cfg)]
    return {"drift": drift, "alerts": [d for d in drift if d["alert"]], "shadow": shadow_report(store),
            "feedback": feedback_report(store)}


def print_monitor(store: Store, cfg: Any, as_json: bool = False, job: int | None = None) -> int:
    if job is not None:
        rows = [{"finding": f.number, "tracking_id": f.tracking_id, "type": f.finding_type,
                 "confidence": f.confidence,
                 "measurements": "; ".join(f"{m['concept']} {m['value']:g} {m['unit']}" for m in f.measurements)}
                for f in job_findings(store, job)]
        print(json.dumps(rows, indent=2) if as_json else
              _table(rows, ["finding", "tracking_id", "type", "confidence", "measurements"]) if rows else
              f"job {job}: no recorded findings")
        return 0
    rep = monitor_report(store, cfg)
    if as_json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"DRIFT ALERTS: {len(rep['alerts'])}")
    cols = ["model", "scanner", "metric", "baseline_n", "window_n", "baseline_mean", "window_mean", "ks",
            "relative_change", "alert"]
    if rep["drift"]:
        print(_table(rep["drift"], cols))
    else:
        print("(not enough studies yet for a drift statistic)")
    print("\nSHADOW AGREEMENT")
    print(_table(rep["shadow"], ["shadow_model", "primary_model", "studies", "count_agreement",
                                 "mean_max_rel_diff", "max_rel_diff"]) if rep["shadow"] else "(none)")
    print("\nRADIOLOGIST FEEDBACK")
    print(_table(rep["feedback"], ["model", "accept", "reject", "correct", "total", "agreement_rate"])
          if rep["feedback"] else "(none)")
    return 0


def feedback(store: Store, job: int, finding: int, verdict: str, value: float | None, reviewer: str | None) -> int:
    try:
        fb = record_feedback(store, job, finding, verdict, value, reviewer)
    except FeedbackError as exc:
        print(f"feedback not recorded: {exc}", file=sys.stderr)
        return 2
    print(f"feedback {fb.id} recorded: job {fb.job_id} finding {fb.finding_number} {fb.verdict}"
          + (f" value {fb.value:g}" if fb.value is not None else "") + f" (model {fb.model})")
    return 0
