"""The drift statistic and the shadow comparison, on plain numbers."""

import numpy as np
import pytest

from node.monitor.drift import ks_statistic
from node.monitor.records import compare


def test_ks_statistic_matches_the_definition():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert ks_statistic(a, a) == 0.0
    assert ks_statistic(a, a + 10) == 1.0
    assert ks_statistic(a, np.array([3.0, 4.0, 5.0, 6.0])) == pytest.approx(0.5)
    from scipy import stats as scipy_stats  # a dependency of ct_lung: cross-check with its implementation

    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, 40), rng.normal(0.5, 1, 30)
    assert ks_statistic(x, y) == pytest.approx(scipy_stats.ks_2samp(x, y).statistic)


def test_compare_pairs_measurements_by_finding_and_concept():
    rows = compare({("total-lung", "Volume"): 1000.0, ("left-lung", "Volume"): 500.0},
                   {("total-lung", "Volume"): 1100.0, ("nodule-1", "Diameter"): 6.0})
    by = {(r["finding"], r["concept"]): r for r in rows}
    assert by[("total-lung", "Volume")]["abs_diff"] == 100.0 and by[("total-lung", "Volume")]["rel_diff"] == 0.1
    assert by[("left-lung", "Volume")]["shadow"] is None and "abs_diff" not in by[("left-lung", "Volume")]
    assert by[("nodule-1", "Diameter")]["primary"] is None
