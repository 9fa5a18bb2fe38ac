"""Usage metering: studies each plugin processed, per department, in one calendar month (local time).

Counts come from the store (jobs and studies), never from logs, so they survive log rotation and
match `ainode status`. A study counts once per group however many of its jobs fell in it.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Sequence

from sqlalchemy import select

from node.report.config import DepartmentsSection
from node.report.headers import institutional_department
from node.progress import progress
from node.report.readonly import ReadOnlyStore
from node.store.models import Job, JobState, Study

GROUPS = ("plugin", "department", "rule", "calling_ae")
PROCESSED = (JobState.DISPATCHED, JobState.DONE_LOCAL)  # the job ended with its results delivered (or kept)
FAILED = (JobState.FAILED, JobState.DEAD_LETTER)
TOTAL = "TOTAL"


def month_window(month: str) -> tuple[float, float]:
    """[start, end) of 'YYYY-MM' in local time, as epoch seconds."""
    try:
        start = datetime.strptime(month, "%Y-%m")
    except ValueError as exc:
        raise ValueError(f"--month {month!r}: expected YYYY-MM, e.g. 2026-11") from exc
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.timestamp(), end.timestamp()


@dataclass
class Counts:
    studies: set[str] = field(default_factory=set)
    jobs: int = 0
    failed: int = 0


@dataclass(frozen=True)
class UsageReport:
    month: str
    by: tuple[str, ...]
    rows: list[tuple[tuple[str, ...], int, int, int]]  # (group values, studies, processed jobs, failed jobs)
    total: tuple[int, int, int]

    @property
    def empty(self) -> bool:
        return self.total == (0, 0, 0)


def usage(store: ReadOnlyStore, departments: DepartmentsSection, month: str, by: Sequence[str]) -> UsageReport:
    """Jobs that finished in `month`, grouped by `by` (names from GROUPS)."""
    unknown = [b for b in by if b not in GROUPS]
    if unknown or not by:
        raise ValueError(f"--by {','.join(by)}: choose from {', '.join(GROUPS)}")
    start, end = month_window(month)
    states = (*PROCESSED, *FAILED)
    with store.session() as s:
        rows = s.execute(
            select(Job.study_uid, Job.plugin, Job.rule, Job.state, Job.series_uids, Study.calling_ae)
            .join(Study, Study.study_uid == Job.study_uid)
            .where(Job.finished_at >= start, Job.finished_at < end, Job.state.in_(states))
            .order_by(Job.id)).all()
        groups: dict[tuple[str, ...], Counts] = {}
        total = Counts()
        dept_of: dict[str, str] = {}
        with progress(f"usage {month}", len(rows)) as advance:
            for study_uid, plugin, rule, state, series_uids, calling_ae in rows:
                if "department" in by and study_uid not in dept_of:
                    header = (institutional_department(s, study_uid, (series_uids or [None])[0])
                              if departments.by_institutional_department else None)
                    dept_of[study_uid] = departments.department(calling_ae, header)
                values = {"plugin": plugin, "rule": rule, "calling_ae": calling_ae or "-",
                          "department": dept_of.get(study_uid, "")}
                c = groups.setdefault(tuple(values[b] for b in by), Counts())
                for counts in (c, total):
                    if state in PROCESSED:
                        counts.studies.add(study_uid)
                        counts.jobs += 1
                    else:
                        counts.failed += 1
                advance()
    out = [(k, len(c.studies), c.jobs, c.failed) for k, c in sorted(groups.items())]
    return UsageReport(month, tuple(by), out, (len(total.studies), total.jobs, total.failed))


HEADER = ("studies", "jobs", "failed_jobs")


def write_csv(report: UsageReport, path: Path) -> None:
    """One row per group and a last TOTAL row; a month with nothing has only the TOTAL row, all zeros."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["month", *report.by, *HEADER])
        for keys, *counts in report.rows:
            w.writerow([report.month, *keys, *counts])
        w.writerow([report.month, TOTAL, *[""] * (len(report.by) - 1), *report.total])


def print_table(report: UsageReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console() if Console().is_terminal else Console(width=200, color_system=None)
    table = Table(title=f"Studies processed in {report.month} (jobs finished dispatched or done; local time)")
    for b in report.by:
        table.add_column(b)
    for h in HEADER:
        table.add_column(h, justify="right")
    for keys, *counts in report.rows:
        table.add_row(*keys, *map(str, counts))
    table.add_row(TOTAL, *[""] * (len(report.by) - 1), *map(str, report.total), style="bold")
    console.print(table)
    if report.empty:
        console.print(f"no jobs finished in {report.month}: every count is 0")
