"""Rule evaluation: pure functions from a study's attributes to jobs."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Sequence

from node.config.schema import FORWARD, Rule, SeriesMatch
from node.store import InstanceMeta, NewJob


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


def series_fits(m: SeriesMatch, s: SeriesFacts) -> bool:
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


def series_matches(rule: Rule, s: SeriesFacts) -> bool:
    return series_fits(rule.series, s)


def study_mismatch(rule: Rule, st: StudyFacts) -> str | None:
    """Which study condition fails, in the rule's terms; None if all hold."""
    m = rule.study
    if m.calling_ae and (st.calling_ae or "").upper() not in _upper(m.calling_ae):
        return f"study.calling_ae: sender not in {m.calling_ae}"
    if m.study_description and not re.search(m.study_description, st.study_description or "", re.IGNORECASE):
        return f"study.study_description: no match for {m.study_description!r}"
    return None


def study_matches(rule: Rule, st: StudyFacts) -> bool:
    return study_mismatch(rule, st) is None


def describe(m: SeriesMatch) -> str:
    """The condition in the rule's own terms (never the study's values: they may identify a patient)."""
    parts = [f"modality in {m.modality}" if m.modality else "",
             f"body_part in {m.body_part}" if m.body_part else "",
             f"series_description ~ {m.series_description!r}" if m.series_description else "",
             f"slice_thickness in [{m.slice_thickness[0]:g}, {m.slice_thickness[1]:g}]" if m.slice_thickness else "",
             f"min_instances {m.min_instances}" if m.min_instances > 1 else ""]
    return ", ".join(p for p in parts if p) or "any series"


@dataclass(frozen=True)
class Evaluation:
    matches: list[tuple[Rule, NewJob]]
    not_matched: dict[str, str]  # rule name → why it did not fire
    missing_required: dict[str, str]  # the subset that failed only for a `requires` entry


def evaluate_all(rules: Sequence[Rule], study: StudyFacts) -> Evaluation:
    """Every matching rule, in config order, each with the one series it will analyse; and why the others
    did not match.

    The chosen series is the matching one with the most instances, then the
    thinnest slices: the series a radiologist would pick for volumetry.
    """
    out, why, required = [], {}, {}
    for rule in rules:
        bad_study = study_mismatch(rule, study)
        if bad_study:
            why[rule.name] = bad_study
            continue
        candidates = [s for s in study.series if series_matches(rule, s)]
        if not candidates:
            why[rule.name] = f"series: no series with {describe(rule.series)} ({len(study.series)} series held)"
            continue
        lacking = [i for i, m in enumerate(rule.requires) if not any(series_fits(m, s) for s in study.series)]
        if lacking:
            why[rule.name] = required[rule.name] = "; ".join(
                f"requires.{i}: no series with {describe(rule.requires[i])}" for i in lacking)
            continue
        best = max(candidates, key=lambda s: (s.instance_count, -(s.slice_thickness or 1e9)))
        out.append((rule, NewJob(rule=rule.name, plugin=rule.plugin, priority=rule.priority,
                                 series_uids=[best.series_uid], destinations=list(rule.destinations))))
    return Evaluation(out, why, required)


def could_take(rules: Sequence[Rule], meta: InstanceMeta) -> frozenset[str]:
    """The plugins of the rules that could analyse this instance's series once its study is complete (its
    instance count aside): whose workers may read the series while it arrives (node/run/read_ahead.py)."""
    study = StudyFacts(meta.study_uid, meta.calling_ae, meta.study_description, ())
    series = SeriesFacts(meta.series_uid, meta.modality, meta.body_part, meta.series_description,
                         meta.slice_thickness, instance_count=sys.maxsize)
    return frozenset(r.plugin for r in rules
                     if r.plugin != FORWARD and study_matches(r, study) and series_matches(r, series))


def evaluate(rules: Sequence[Rule], study: StudyFacts) -> list[tuple[Rule, NewJob]]:
    """The matching rules and their jobs (see evaluate_all)."""
    return evaluate_all(rules, study).matches
