"""Stat before routine, oldest first; a routine job waiting past run.routine_max_wait_s is not starved."""

import time

from node.store import NewJob, Store
from node.store.db import InstanceMeta


def queue(store, n, priority, prefix):
    ids = []
    for k in range(n):
        uid = f"{prefix}.{k}"
        store.add_instance(InstanceMeta(f"{uid}.9", "1.2.840.10008.5.1.4.1.1.2", f"{uid}.5", uid,
                                        "1.2.840.10008.1.2.1", f"/x/{uid}", 1, "A"))
        store.mark_complete(uid, "quiet-period", time.time() + 1)
        ids += store.route(uid, [NewJob("r", "ct_lung", priority, [f"{uid}.5"], [])])
    return ids


def test_stat_jumps_a_backlog_of_20_routine_jobs_and_aged_routine_is_not_starved(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    routine = queue(store, 20, "routine", "1.2.1")
    assert store.claim_job(routine_max_wait_s=900).id == routine[0]  # one routine job is running
    stat = queue(store, 2, "stat", "1.2.2")
    # With one slot busy, the stat jobs wait only for that running job: they are next, in arrival order.
    assert [store.claim_job(routine_max_wait_s=900).id for _ in range(2)] == stat
    assert store.claim_job(routine_max_wait_s=900).id == routine[1]

    # A flood of stat work: routine jobs that waited past the limit take their turn, oldest first.
    flood = queue(store, 3, "stat", "1.2.3")
    assert store.claim_job(routine_max_wait_s=0.001).id == routine[2]
    assert store.claim_job(routine_max_wait_s=900).id == flood[0]
    store.close()
