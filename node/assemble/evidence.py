"""Evidence-based completion: a study is complete as soon as the node holds every instance its PACS has.

When to ask, so that a busy receive never hammers the PACS:
- only once the study has been quiet for `evidence_check_s` (instances of one send arrive milliseconds apart);
- only if the node received something since the PACS last answered (otherwise the answer cannot change
  our verdict: a PACS that gets more from the modality forwards it, and that arrival asks again);
- at most once per `min_interval_s` per study, unless the node now holds as many as the last answer said;
- not while the PACS is known to be down (one failed connection mutes it for `min_interval_s`);
- at most `MAX_PARALLEL` C-FINDs at a time, each in a worker thread with the source's timeout, so a slow PACS
  delays neither the quiet-period completion nor routing, and no store lock is held while asking.
A PACS that is down or answers without counts leaves the study to the quiet period (logged once per study).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping

from node.assemble.find import ExpectedCounts, QueryError, expected_counts
from node.audit import AuditLog
from node.config.schema import Source
from node.store import Store
from node.store.db import HeldCounts, ReceivingStudy
from node.store.models import CompletionReason

log = logging.getLogger("ainode.assemble")

MAX_PARALLEL = 2  # C-FIND associations open at once, over all sources: a PACS is never asked in bulk

QueryFn = Callable[[Source, str, str, Callable[[int], bool]], ExpectedCounts]


@dataclass
class _Check:
    """What the node knows about one receiving study's PACS answers (in memory; a restart just asks again)."""

    asked_at: float = float("-inf")
    answered_upto: float = float("-inf")  # the study's last_received_at when the last question was asked
    expected: int | None = None  # the PACS's last study-level count
    in_flight: bool = False
    why_not: str | None = None  # why the last check did not complete the study
    warned: bool = False


def missing(expected: ExpectedCounts, held: HeldCounts) -> str | None:
    """None if every instance the PACS listed is held, else what is missing (UIDs and counts only)."""
    if held.instances < expected.instances:
        return f"held {held.instances} of {expected.instances} instances"
    for series_uid, n in sorted((expected.series or {}).items()):
        have = held.series.get(series_uid, 0)
        if have < n:
            return f"series {series_uid}: held {have} of {n} instances"
    return None


@dataclass
class EvidenceChecker:
    store: Store
    audit: AuditLog
    sources: Mapping[str, Source]
    node_ae: str
    check_after_s: float
    min_interval_s: float
    query: QueryFn = expected_counts
    clock: Callable[[], float] = time.time
    on_complete: Callable[[], None] | None = None  # wakes the assemble loop: a completed study is routed at once
    _checks: dict[str, _Check] = field(default_factory=dict, init=False)
    _down_until: dict[str, float] = field(default_factory=dict, init=False)  # source name → muted until
    _done: list[str] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(MAX_PARALLEL, thread_name_prefix="evidence"), init=False)

    def source_for(self, calling_ae: str | None) -> tuple[str, Source] | None:
        """The queryable source vouching for studies sent by `calling_ae` (config ensures at most one)."""
        ae = (calling_ae or "").strip().upper()
        for name, src in self.sources.items():
            if src.query and ae in src.senders():
                return name, src
        return None

    def consider(self, st: ReceivingStudy) -> None:
        """Called each tick for a study quiet for at least `check_after_s`: ask its PACS if due."""
        found = self.source_for(st.calling_ae)
        if found is None:
            return
        name, src = found
        now = self.clock()
        with self._lock:
            c = self._checks.setdefault(st.study_uid, _Check())
            if c.in_flight or st.last_received_at <= c.answered_upto:
                return
            likely = c.expected is not None and st.instance_count >= c.expected
            if now - c.asked_at < self.min_interval_s and not likely:
                return
            if now < self._down_until.get(name, float("-inf")):
                c.why_not = c.why_not or f"source '{name}' unreachable"  # keep this study's own error if it has one
                return
            c.in_flight, c.asked_at, c.answered_upto = True, now, st.last_received_at
        self._pool.submit(self._check, st.study_uid, name, src)

    def _check(self, study_uid: str, name: str, src: Source) -> None:
        try:
            self._check_once(study_uid, name, src)
        except Exception:  # noqa: BLE001 - a bug here must not kill the pool; the quiet period still applies
            log.exception("evidence check failed study_uid=%s source=%s", study_uid, name)
        finally:
            with self._lock:
                if study_uid in self._checks:
                    self._checks[study_uid].in_flight = False

    def _check_once(self, study_uid: str, name: str, src: Source) -> None:
        before = self.store.held_counts(study_uid)
        if before is None:
            return  # completed meanwhile
        try:
            # Series level only when the study-level count says we might have everything.
            expected = self.query(src, self.node_ae, study_uid, lambda n: before.instances >= n)
        except QueryError as exc:
            self._failed(study_uid, name, exc)
            return
        with self._lock:
            if study_uid in self._checks:
                self._checks[study_uid].expected = expected.instances
        held = self.store.held_counts(study_uid)  # fresh: instances may have arrived during the query
        if held is None:
            return
        gap = missing(expected, held) if expected.series is not None else \
            f"held {before.instances} of {expected.instances} instances"
        if gap is None and self.store.mark_complete(study_uid, CompletionReason.COUNTS_MATCHED,
                                                    held.last_received_at):
            st = self.store.get_study(study_uid)
            self.audit.append("study-complete", study_uid=study_uid, reason=CompletionReason.COUNTS_MATCHED,
                              instances=held.instances, revision=st.revision if st else None, source=name,
                              expected_instances=expected.instances, expected_series=len(expected.series or {}))
            log.info("study complete study_uid=%s reason=%s source=%s instances=%d", study_uid,
                     CompletionReason.COUNTS_MATCHED, name, held.instances)
            with self._lock:
                self._checks.pop(study_uid, None)
                self._done.append(study_uid)
            if self.on_complete is not None:
                self.on_complete()
            return
        with self._lock:
            if study_uid in self._checks:
                self._checks[study_uid].why_not = gap or "an instance arrived during the query"

    def _failed(self, study_uid: str, name: str, exc: QueryError) -> None:
        with self._lock:
            if exc.unreachable:
                self._down_until[name] = self.clock() + self.min_interval_s
            c = self._checks.get(study_uid)
            if c is None:
                return
            c.answered_upto = float("-inf")  # not answered: ask again after min_interval_s (a timeout, a refusal)
            c.why_not = str(exc)
            first, c.warned = not c.warned, True
        if first:
            log.warning("no completion evidence study_uid=%s source=%s: %s; the study completes after the "
                        "quiet period", study_uid, name, exc)

    def drain(self) -> list[str]:
        """Studies completed by counts since the last call (to be routed)."""
        with self._lock:
            done, self._done = self._done, []
        return done

    def forget(self, study_uid: str) -> str | None:
        """The study completed another way: drop its state; why evidence did not complete it, if asked."""
        with self._lock:
            c = self._checks.pop(study_uid, None)
        return c.why_not if c else None

    def retain(self, receiving: set[str]) -> None:
        """Drop the state of studies that are no longer receiving, however they left: completed or purged by
        another node sharing the store, which never calls `forget` here. Without this, a long-running node
        would keep one entry per such study for ever."""
        with self._lock:
            for uid in [u for u, c in self._checks.items() if u not in receiving and not c.in_flight]:
                del self._checks[uid]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
