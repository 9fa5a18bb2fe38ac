"""Store transitions under concurrency, on SQLite and on a real PostgreSQL: several Store objects on one
database stand for several node processes (each its own instance id, engine and process-local lock).

SQLite serves one node process (its writers are serialised by the Store's lock): there, the concurrent
tests run their threads on one Store, as one node's threads do.
"""

import dataclasses
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from node.store import DispatchItem, InstanceMeta, JobState, NewJob, Store
from node.store.db import pid_alive
from node.store.models import Dispatch

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def stores(url):
    """open(n): n Store objects on one database, all closed at the end."""
    opened: list[Store] = []

    def open_(n: int, concurrent: bool = False) -> list[Store]:
        if concurrent and url.startswith("sqlite"):
            opened.append(Store(url))
            return [opened[-1]] * n
        new = [Store(url) for _ in range(n)]
        opened.extend(new)
        return new

    yield open_
    for s in opened:
        s.close()


def meta(study: str, n: int, series: str | None = None) -> InstanceMeta:
    return InstanceMeta(f"{study}.{n}", CT, series or f"{study}.0", study, "1.2.840.10008.1.2.1", f"/x/{study}/{n}",
                        1, "A")


def routed_jobs(store: Store, studies: int, plugins=("a",)) -> list[int]:
    ids = []
    for i in range(studies):
        uid = f"1.2.{i + 1}"
        store.add_instance(meta(uid, 1))
        store.mark_complete(uid, "quiet-period", time.time() + 1)
        ids += store.route(uid, [NewJob(f"r{p}", p, "routine", [f"{uid}.0"], ["pacs"]) for p in plugins])
    return ids


def test_claim_job_never_claims_a_job_twice(stores):
    first, *others = stores(4, concurrent=True)
    ids = routed_jobs(first, 40)
    claimed: list[tuple[str, int]] = []
    lock = threading.Lock()

    def claimer(store: Store) -> None:
        while (job := store.claim_job(900)) is not None:
            with lock:
                claimed.append((store.instance_id, job.id))

    with ThreadPoolExecutor(8) as pool:  # 4 "processes", 2 worker threads each
        list(pool.map(claimer, [first, *others] * 2))
    assert sorted(j for _, j in claimed) == sorted(ids)
    for inst, job_id in claimed:
        job = first.get_job(job_id)
        assert job.state == JobState.RUNNING and job.attempts == 1 and job.owner == inst


def test_claim_job_keeps_may_run_and_admit(stores):
    [store] = stores(1)
    routed_jobs(store, 2, plugins=("big", "small"))
    assert store.claim_job(900, may_run=lambda p: p == "small").plugin == "small"
    assert store.claim_job(900, admit=lambda job: False) is None  # the most urgent may not run: nothing claimed
    assert store.claim_job(900).plugin == "big"
    assert store.claim_job(900, may_run=lambda p: p == "nothing") is None


def test_two_receivers_of_one_study_lose_no_count(stores):
    a, b = stores(2, concurrent=True)
    per = 30
    first_pass = threading.Barrier(2, timeout=60)  # else one receiver may repeat an instance the other has yet to send

    def receive(store: Store, start: int) -> None:
        for n in range(start, start + per):
            assert store.add_instance(meta("1.2.9", n, series=f"1.2.9.s{n % 3}"))
        first_pass.wait()
        for n in range(per):  # the same instances again, from the other receiver: already held
            store.add_instance(meta("1.2.9", n))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(receive, [a, b], [0, per]))
    assert a.get_study("1.2.9").instance_count == 2 * per
    assert sum(s.instance_count for s in a.series_of("1.2.9")) == 2 * per


def test_a_study_is_routed_once(stores):
    all_ = stores(4, concurrent=True)
    all_[0].add_instance(meta("1.2.7", 1))
    all_[0].mark_complete("1.2.7", "quiet-period", time.time() + 1)
    with ThreadPoolExecutor(4) as pool:
        made = list(pool.map(lambda s: s.route("1.2.7", [NewJob("r", "a", "stat", ["1.2.7.0"], [])]), all_))
    assert sorted(len(m) for m in made) == [0, 0, 0, 1]


def test_a_request_is_handled_and_a_study_purged_once(stores):
    all_ = stores(3, concurrent=True)
    [job_id] = routed_jobs(all_[0], 1)
    all_[0].claim_job()
    all_[0].job_failed(job_id, "boom")
    req = all_[0].add_request("requeue", job_id=job_id)
    with ThreadPoolExecutor(3) as pool:
        outcomes = list(pool.map(lambda s: s.requeue(req), all_))
    assert sum(o is not None for o in outcomes) == 1
    assert all_[0].get_job(job_id).state == JobState.QUEUED
    all_[0].claim_job()
    assert all_[0].job_results_built(job_id, "1", "", {}, [])
    with ThreadPoolExecutor(3) as pool:
        purged = list(pool.map(lambda s: s.purge_study("1.2.1", time.time() + 1), all_))
    assert sorted(map(len, purged)) == [0, 0, 1]


def test_dispatches_are_leased_to_one_dispatcher(stores):
    a, b = stores(2, concurrent=True)
    ids = routed_jobs(a, 6)
    for job_id in ids:
        a.claim_job()
        a.job_results_built(job_id, "1", "", {}, [DispatchItem("pacs", "SR", "1.2", f"9.{job_id}.{k}", "/r")
                                                  for k in range(3)])
    now = time.time()
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda s: s.claim_dispatches(now, lease_s=60), [a, b]))
    claimed = [d.id for rows in got for d in rows]
    assert len(claimed) == len(set(claimed)) == 18
    assert a.claim_dispatches(now + 1, 60) == [] and b.claim_dispatches(now + 1, 60) == []
    a.dispatch_sent([d.id for d in got[0]])
    later = b.claim_dispatches(now + 61, 60)  # a lease that ran out (its dispatcher died): due again
    assert sorted(d.id for d in later) == sorted(d.id for d in got[1])
    b.release_dispatches([d.id for d in later])
    assert len(a.claim_dispatches(time.time(), 60)) == len(later)


def test_a_dead_instance_s_jobs_are_taken_over_not_a_live_one_s(stores):
    a, b, c = stores(3)
    for s, name in ((a, "A"), (b, "B"), (c, "C")):
        s.register_instance(name)
    j1, j2, j3 = routed_jobs(a, 3)
    assert a.claim_job().id == j1 and b.claim_job().id == j2
    a.job_results_built(j1, "1", "", {}, [DispatchItem("pacs", "SR", "1.2", "9.9", "/r")])
    assert a.claim_job().id == j3
    leased = a.claim_dispatches(time.time(), lease_s=600)
    assert [d.job_id for d in leased] == [j1]
    assert c.take_over(dead_after_s=30, max_attempts=3) == []  # every owner heartbeats
    assert [p.name for p in c.live_peers(30)] == ["A", "B"]

    b.heartbeat()
    time.sleep(1.2)
    b.heartbeat()  # B stays alive; A stops heartbeating
    taken = c.take_over(dead_after_s=1.0, max_attempts=3)
    assert [(t.job.id, t.from_instance, t.outcome) for t in taken] == [(j3, a.instance_id, "requeued")]
    assert c.get_job(j3).state == JobState.QUEUED and c.get_job(j2).state == JobState.RUNNING
    assert [p.name for p in c.live_peers(1.0)] == ["B"]
    # A's lease ended with it: the dispatch is due now, for another dispatcher.
    assert [d.id for d in c.claim_dispatches(time.time(), 600)] == [leased[0].id]
    # A was only stalled: its late result is not recorded (the job runs again elsewhere), and it hears so.
    assert a.job_results_built(j3, "1", "", {}, []) is False
    assert a.heartbeat() == c.instance_id
    assert c.claim_job().id == j3 and c.get_job(j3).attempts == 2


def test_same_host_gone_process_is_dead_at_once_and_attempts_count(stores):
    a, b = stores(2)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not pid_alive(gone.pid) and pid_alive(os.getpid())
    [job_id] = routed_jobs(a, 1)
    a.register_instance("A")
    with a.session() as s, s.begin():  # as if A had been that process
        from node.store.models import NodeInstance

        s.get(NodeInstance, a.instance_id).pid = gone.pid
    a.claim_job()
    [t] = b.take_over(dead_after_s=3600, max_attempts=1)  # heartbeat fresh, but the process is gone
    assert t.outcome == "failed" and "interrupted 1 times" in t.job.error
    assert b.get_job(job_id).state == JobState.FAILED


def test_two_dispatchers_roll_a_job_up_once_all_its_objects_are_sent(stores):
    a, b = stores(2, concurrent=True)
    [job_id] = routed_jobs(a, 1)
    a.claim_job()
    a.job_results_built(job_id, "1", "", {}, [DispatchItem("pacs", "SR", "1.2", f"9.{k}", "/r") for k in range(2)])
    with a.session() as s:
        d1, d2 = sorted(s.query(Dispatch.id).all())
    barrier = threading.Barrier(2)

    def send(store: Store, did: int) -> None:
        barrier.wait()
        store.dispatch_sent([did])

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(send, [a, b], [d1[0], d2[0]]))
    assert a.get_job(job_id).state == JobState.DISPATCHED


CLAIMER = """
import sys, time
from node.store import Store
store = Store(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # all start claiming together
while (job := store.claim_job(900)) is not None:
    print(job.id, flush=True)
    time.sleep(0.005)  # a worker does something with its job before it claims the next
store.close()
"""


def test_claiming_processes_never_share_a_job(pg_url):
    """Node processes (not threads) claiming from one PostgreSQL queue: each job goes to exactly one."""
    store = Store(pg_url)
    ids = routed_jobs(store, 60)
    store.close()
    go = str(time.time() + 8)
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, pg_url, go], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    got = [list(map(int, p.communicate(timeout=120)[0].split())) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(j for g in got for j in g) == sorted(ids)
    assert sum(1 for g in got if g) == 4  # the processes really competed


def test_a_descriptive_value_longer_than_its_column_is_indexed_cut_not_refused(stores):
    """A sender's over-long text (a 20-character accession number, where SH allows 16) must not make the
    row's INSERT fail on PostgreSQL, which would refuse the instance, and every resend of it: the file keeps
    the whole value, the index a cut one."""
    (store,) = stores(1)
    long = {"patient_id": "P" * 70, "accession_number": "A" * 20, "study_description": "S" * 70,
            "modality": "M" * 20, "body_part": "B" * 70, "series_description": "D" * 70}
    m = dataclasses.replace(meta("1.2.9", 1), **long)
    assert store.add_instances([m]) == [True]
    study = store.get_study("1.2.9")
    assert (study.accession_number, study.patient_id) == ("A" * 16, "P" * 64)
