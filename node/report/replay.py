"""Rule replay: which past studies a changed rule set would route differently, decided on their stored
headers and compared with the jobs the node actually created. Nothing is sent or written.

The baseline is the stored jobs (what really happened), not the old rules evaluated again, so a rule
set edited during the window is compared with what each study really got.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from sqlalchemy import select

from node.config.schema import Rule
from node.progress import progress
from node.report.readonly import ReadOnlyStore
from node.route.router import Router
from node.route.rules import evaluate_all
from node.store.models import PRIORITY, Job, Study, StudyState

ROUTED_STATES = (StudyState.ROUTED, StudyState.NO_RULE, StudyState.PURGED)
PRIORITY_NAME = {v: k for k, v in PRIORITY.items()}


def parse_since(text: str, now: float | None = None) -> float:
    """'7d', '12h', '30m' back from now, or a date 'YYYY-MM-DD[THH:MM]' (local time): epoch seconds."""
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([dhm])\s*", text)
    if m:
        return now - float(m.group(1)) * {"d": 86400, "h": 3600, "m": 60}[m.group(2)]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise ValueError(f"--since {text!r}: expected e.g. 7d, 12h, 30m or 2026-11-01") from exc


@dataclass(frozen=True)
class Route:
    """One rule's job for a study, in the terms replay compares."""

    plugin: str
    priority: str
    destinations: tuple[str, ...]
    series_uid: str | None

    def describe(self) -> str:
        return (f"plugin {self.plugin}, priority {self.priority}, "
                f"destinations [{', '.join(self.destinations) or 'none'}], series {self.series_uid}")


@dataclass(frozen=True)
class Change:
    rule: str
    kind: str  # "added" | "removed" | "changed"
    before: Route | None
    after: Route | None

    def describe(self) -> str:
        if self.kind == "added":
            return f"+ rule {self.rule}: would now run: {self.after.describe()}"  # type: ignore[union-attr]
        if self.kind == "removed":
            return f"- rule {self.rule}: would no longer run (was: {self.before.describe()})"  # type: ignore[union-attr]
        b, a = self.before, self.after
        diffs = [f"{name} {x} → {y}" for name, x, y in (
            ("plugin", b.plugin, a.plugin), ("priority", b.priority, a.priority),  # type: ignore[union-attr]
            ("destinations", list(b.destinations), list(a.destinations)),  # type: ignore[union-attr]
            ("series", b.series_uid, a.series_uid)) if x != y]  # type: ignore[union-attr]
        return f"~ rule {self.rule}: {'; '.join(diffs)}"


@dataclass(frozen=True)
class StudyDiff:
    study_uid: str
    calling_ae: str | None
    received_at: float
    changes: list[Change]


@dataclass(frozen=True)
class ReplayResult:
    since: float
    studies: int  # studies examined
    diffs: list[StudyDiff]


def _stored_routes(session, study_uid: str) -> dict[str, Route]:  # type: ignore[no-untyped-def]
    jobs = session.scalars(select(Job).where(Job.study_uid == study_uid).order_by(Job.id))
    return {j.rule: Route(j.plugin, PRIORITY_NAME.get(j.priority, str(j.priority)), tuple(j.destinations or ()),
                          (j.series_uids or [None])[0]) for j in jobs}


def compare(before: dict[str, Route], after: dict[str, Route]) -> list[Change]:
    out = []
    for rule in [*before, *(r for r in after if r not in before)]:
        b, a = before.get(rule), after.get(rule)
        if b == a:
            continue
        out.append(Change(rule, "added" if b is None else "removed" if a is None else "changed", b, a))
    return out


def replay(store: ReadOnlyStore, rules: Sequence[Rule], since: float) -> ReplayResult:
    """Every routed study received since `since`, evaluated with `rules` as the router would."""
    facts_of = Router(store, audit=None, rules=rules).facts  # type: ignore[arg-type]  # reads only
    with store.session() as s:
        studies = s.execute(select(Study.study_uid, Study.calling_ae, Study.first_received_at)
                            .where(Study.first_received_at >= since, Study.state.in_(ROUTED_STATES))
                            .order_by(Study.first_received_at, Study.study_uid)).all()
        diffs = []
        with progress("replay", len(studies)) as advance:
            for study_uid, calling_ae, received in studies:
                facts = facts_of(study_uid)
                if facts is not None:
                    new = {rule.name: Route(job.plugin, job.priority, tuple(job.destinations), job.series_uids[0])
                           for rule, job in evaluate_all(rules, facts).matches}
                    changes = compare(_stored_routes(s, study_uid), new)
                    if changes:
                        diffs.append(StudyDiff(study_uid, calling_ae, received, changes))
                advance()
    return ReplayResult(since, len(studies), diffs)


def print_result(result: ReplayResult, source: str) -> None:
    since = datetime.fromtimestamp(result.since).strftime("%Y-%m-%d %H:%M")
    for d in result.diffs:
        print(f"study {d.study_uid}  from={d.calling_ae or '-'}  "
              f"received={datetime.fromtimestamp(d.received_at).strftime('%Y-%m-%d %H:%M:%S')}")
        for c in d.changes:
            print(f"  {c.describe()}")
    print(f"{len(result.diffs)} of {result.studies} routed studies received since {since} would be routed "
          f"differently by the rules in {source} (nothing was sent or written)")
