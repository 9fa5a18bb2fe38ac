"""`monitoring:` config section: drift windows and thresholds."""

from __future__ import annotations

from pydantic import Field

from node.config.base import Strict


class MonitoringSection(Strict):
    baseline_studies: int = Field(50, ge=2, description="Baseline: the first this many studies of a model "
                                  "version (all scanners), the outputs it was accepted with.")
    window_studies: int = Field(20, ge=2, description="Window: the latest this many studies of each scanner "
                                "after the baseline, compared with the baseline.")
    min_samples: int = Field(10, ge=2, description="No drift statistic until baseline and window each hold "
                             "this many values.")
    ks_threshold: float = Field(0.5, gt=0, le=1, description="Alert when the two-sample Kolmogorov-Smirnov "
                                "statistic of a metric (window vs baseline) reaches this ...")
    min_relative_change: float = Field(0.1, ge=0, description="... and its mean moved by at least this share of "
                                       "the baseline mean (0.1: a 10% change, a major risk for regulators).")
    check_interval_s: float = Field(60, gt=0, description="How often the node checks for drift.")
