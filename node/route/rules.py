"""Rule evaluation: pure functions from a study's attributes to jobs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from node.config.schema import Rule
from node.store import NewJob


@dataclass(frozen=True)
class SeriesFacts:
    series_uid: str
    modality: str | None
    body_part: str | None
    description: str | None
    slice_thickness: float | None
    instance_count: int


@dataclass(frozen=True)
class StudyFacts:
    study_uid: str
    calling_ae: str | None
    study_description: str | None
    series: Sequence[SeriesFacts]


def _upper(values: Sequence[str]) -> set[str]:
    return {v.strip().upper() for v in values}


def series_matches(rule: Rule, s: SeriesFacts) -> bool:
    m = rule.series
    if m.modality and (s.modality or "").upper() not in _upper(m.modality):
        return False
    if m.body_part and (s.body_part or "").upper() not in _upper(m.body_part):
        return False
    if m.series_description and not re.search(m.series_description, s.description or "", re.IGNORECASE):
        return False
    if m.slice_thickness is not None:
        lo, hi = m.slice_thickness
        if s.slice_thickness is None or not lo <= s.slice_thickness <= hi:
            return False
    return s.instance_count >= m.min_instances


def study_matches(rule: Rule, st: StudyFacts) -> bool:
    m = rule.study
    if m.calling_ae and (st.calling_ae or "").upper() not in _upper(m.calling_ae):
        return False
    if m.study_description and not re.search(m.study_description, st.study_description or "", re.IGNORECASE):
        return False
    return True


def evaluate(rules: Sequence[Rule], study: StudyFacts) -> list[tuple[Rule, NewJob]]:
    """Every matching rule, in config order, each with the one series it will analyse.

    The chosen series is the matching one with the most instances, then the
    thinnest slices: the series a radiologist would pick for volumetry.
    """
    out = []
    for rule in rules:
        if not study_matches(rule, study):
            continue
        candidates = [s for s in study.series if series_matches(rule, s)]
        if not candidates:
            continue
        best = max(candidates, key=lambda s: (s.instance_count, -(s.slice_thickness or 1e9)))
        out.append((rule, NewJob(rule=rule.name, plugin=rule.plugin, priority=rule.priority,
                                 series_uids=[best.series_uid], destinations=list(rule.destinations))))
    return out
