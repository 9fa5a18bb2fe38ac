"""bench/stat_wait.py's check of the queue order, on audit records made up for it (the bench itself runs a
node and 22 studies: a minute, too long for the suite)."""

from __future__ import annotations

from datetime import datetime, timedelta

from bench.stat_wait import job_rows, stat_order

T0 = datetime(2026, 12, 6, 4, 0, 0)


def rec(event: str, at: float, **fields: object) -> dict:
    return {"event": event, "ts": (T0 + timedelta(seconds=at)).isoformat(), **fields}


def job(job_id: int, rule: str, study: str, queued: float, start: float, end: float) -> list[dict]:
    return [rec("rule-matched", queued, study_uid=study, rule=rule, job_id=job_id),
            rec("job-start", start, study_uid=study, rule=rule, job_id=job_id),
            rec("job-end", end, study_uid=study, job_id=job_id)]


def check(recs: list[dict], workers: int = 1) -> list[dict]:
    return stat_order(recs, job_rows(recs), workers)


def test_a_wait_for_the_restarted_worker_is_start_up_not_the_queue():
    recs = [rec("study-complete", 0.0, study_uid=s) for s in ("r1", "s1", "s2")]
    recs += job(1, "routine", "r1", 0.05, 1.7, 2.0) + job(2, "stat", "s1", 0.1, 0.9, 1.3)
    recs += job(3, "stat", "s2", 0.12, 1.3, 1.7)
    first, second = check(recs)
    assert (first["study"], round(first["wait_s"], 2), round(first["startup_s"], 2)) == ("s1", 0.9, 0.9)
    assert (first["running"], first["overtook"], first["ok"]) == (0, 0, True)
    assert (second["study"], second["overtook"], second["ok"]) == ("s2", 0, True)


def test_a_routine_job_started_after_the_stat_job_was_queued_breaks_the_bound():
    recs = [rec("study-complete", 0.0, study_uid=s) for s in ("r1", "s1")]
    recs += job(1, "routine", "r1", 0.05, 0.3, 0.6) + job(2, "stat", "s1", 0.1, 0.6, 0.9)
    (stat,) = check(recs)
    assert (stat["running"], stat["overtook"], stat["ok"]) == (0, 1, False)


def test_one_routine_job_running_per_worker_is_within_the_bound():
    recs = [rec("study-complete", 0.0, study_uid=s) for s in ("r1", "r2", "s1")]
    recs += job(1, "routine", "r1", 0.01, 0.02, 0.5) + job(2, "routine", "r2", 0.01, 0.03, 0.6)
    recs += job(3, "stat", "s1", 0.1, 0.5, 0.9)
    (stat,) = check(recs, workers=2)
    assert (stat["running"], stat["overtook"], stat["ok"]) == (2, 0, True)
    (stat,) = check(recs, workers=1)  # two running beside one worker: more than it can have been
    assert stat["ok"] is False
