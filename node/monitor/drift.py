"""Drift of a model's outputs per scanner: each scanner's latest window against the model's baseline.

Baseline: the first `baseline_studies` studies a model version processed (all scanners) — the outputs
it went live with. Window: the latest `window_studies` studies of one scanner after the baseline. Per
metric (finding count, mean confidence, each measurement such as "total-lung Volume") the two-sample
Kolmogorov-Smirnov statistic D says whether the distributions differ; an alert also needs the mean to
have moved by `min_relative_change` of the baseline mean, so a tiny but consistent shift (D = 1 on
near-constant outputs) is not an alert. Nothing is computed below `min_samples` values per side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sqlalchemy import select

from node.monitor.config import MonitoringSection
from node.store import Store
from node.store.models import FindingStats, JobOutputStats


@dataclass(frozen=True)
class MetricDrift:
    model: str
    scanner: str
    metric: str
    baseline_n: int
    window_n: int
    baseline_mean: float
    window_mean: float
    ks: float
    relative_change: float | None
    alert: bool

    def as_dict(self) -> dict:
        return asdict(self)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov D: the largest gap between the two empirical distribution functions."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(fa - fb)))


def _metrics(store: Store) -> tuple[list[JobOutputStats], dict[int, dict[str, float]]]:
    """Every job output in job order, and each job's metric values."""
    with store.session() as s:
        outputs = list(s.scalars(select(JobOutputStats).order_by(JobOutputStats.job_id)))
        values: dict[int, dict[str, float]] = {o.job_id: {"finding_count": float(o.finding_count)} for o in outputs}
        conf: dict[int, list[float]] = {}
        for f in s.scalars(select(FindingStats)):
            v = values.setdefault(f.job_id, {})
            if f.confidence is not None:
                conf.setdefault(f.job_id, []).append(f.confidence)
            for m in f.measurements:
                v[f"{f.tracking_id} {m['concept']} [{m['unit']}]"] = float(m["value"])
        for job_id, c in conf.items():
            values[job_id]["mean_confidence"] = float(np.mean(c))
    return outputs, values


def drift_report(store: Store, cfg: MonitoringSection) -> list[MetricDrift]:
    """Every (model version, scanner, metric) with enough values on both sides, and whether it alerts."""
    outputs, values = _metrics(store)
    by_model: dict[str, list[JobOutputStats]] = {}
    for o in outputs:
        by_model.setdefault(o.model, []).append(o)
    report = []
    for model, jobs in by_model.items():
        baseline = jobs[:cfg.baseline_studies]
        if len(baseline) < cfg.min_samples:
            continue
        later: dict[str, list[JobOutputStats]] = {}
        for o in jobs[cfg.baseline_studies:]:
            later.setdefault(o.scanner, []).append(o)
        for scanner, rows in sorted(later.items()):
            window = rows[-cfg.window_studies:]
            if len(window) < cfg.min_samples:
                continue
            metrics = sorted({k for o in baseline for k in values[o.job_id]})
            for metric in metrics:
                b = np.array([values[o.job_id][metric] for o in baseline if metric in values[o.job_id]])
                w = np.array([values[o.job_id][metric] for o in window if metric in values[o.job_id]])
                if len(b) < cfg.min_samples or len(w) < cfg.min_samples:
                    continue
                ks = ks_statistic(b, w)
                bm, wm = float(b.mean()), float(w.mean())
                rel = (wm - bm) / abs(bm) if bm else None
                moved = abs(rel) >= cfg.min_relative_change if rel is not None else wm != bm
                report.append(MetricDrift(model, scanner, metric, len(b), len(w), round(bm, 4), round(wm, 4),
                                          round(ks, 4), None if rel is None else round(rel, 4),
                                          ks >= cfg.ks_threshold and moved))
    return report


def current_alerts(store: Store, cfg: MonitoringSection) -> list[MetricDrift]:
    """The drift alerts now (for the API, the status page and `ainode monitor`)."""
    return [d for d in drift_report(store, cfg) if d.alert]
