"""Nothing lost: kill -9 mid-job, a PACS outage, and jobs that keep getting interrupted."""

import signal
import time


from node.store import JobState, NewJob, Store
from node.store.db import InstanceMeta
from node.synth import write_chest_ct
from tests.support.pipeline import lung_config as config
from tests.support.pipeline import result_instances, send
from tests.support.wait import wait_until



def test_kill_9_while_the_plugin_runs_then_restart_dispatches_exactly_once(tmp_path, orthanc, node_factory):
    ct = write_chest_ct(tmp_path / "ct", slices=200, slice_thickness=1.25)
    node = node_factory(config(orthanc))
    send(node, ct.files)
    # Kill point chosen from the node's own state: the job has started.
    wait_until(lambda: any(r["event"] == "job-start" for r in node.audit_records()), 60, "job-start", interval=0.05)
    node.proc.send_signal(signal.SIGKILL)
    node.proc.wait(10)
    assert not any(r["event"] == "job-end" for r in node.audit_records()), "job ended before the kill"

    node.start()
    wait_until(lambda: result_instances(orthanc, ct.study_uid) == {"SEG": 1, "SR": 1}, 120, "SEG and SR")
    wait_until(lambda: "state=dispatched" in node.cli("status", "--config", str(node.config_path)).stdout,
               30, "dispatched")
    starts = [r for r in node.audit_records() if r["event"] == "node-start"]
    assert starts[-1]["jobs_requeued"] == [1]
    stored = sum(1 for r in node.audit_records() if r["event"] == "instance-stored")
    assert stored == len(ct.files)  # every acknowledged instance survived the kill
    time.sleep(1)
    assert result_instances(orthanc, ct.study_uid) == {"SEG": 1, "SR": 1}
    assert node.cli("audit", "verify", "--config", str(node.config_path)).returncode == 0


def test_pacs_down_for_30_s_then_results_arrive_once(tmp_path, orthanc, node_factory):
    ct = write_chest_ct(tmp_path / "ct", slices=60, slice_thickness=5.0)
    node = node_factory(config(orthanc, backoff_initial_s=1.0, backoff_max_s=8.0, max_attempts=20))
    orthanc.stop()
    down_at = time.monotonic()
    send(node, ct.files)
    wait_until(lambda: any(r["event"] == "send-failed" for r in node.audit_records()), 60, "a failed send")
    time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
    orthanc.start()
    # The CT never reached this PACS (the node got it directly), so the study holds only the results.
    wait_until(lambda: result_instances(orthanc, ct.study_uid) == {"SEG": 1, "SR": 1}, 60, "results after outage")
    fails = [r for r in node.audit_records() if r["event"] == "send-failed"]
    assert fails and not any(r["final"] for r in fails)
    assert "state=dispatched" in node.cli("status", "--config", str(node.config_path)).stdout


def test_a_job_interrupted_max_attempts_times_is_failed_not_rerun(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for n, uid in enumerate(("1.2.1", "1.2.2")):
        store.add_instance(InstanceMeta(f"{uid}.9", "1.2.840.10008.5.1.4.1.1.2", f"{uid}.5", uid,
                                        "1.2.840.10008.1.2.1", f"/x/{n}", 1, "A"))
        store.mark_complete(uid, "quiet-period", time.time() + 1)
        store.route(uid, [NewJob("r", "ct_lung", "routine", [f"{uid}.5"], [])])
    # Job 1 (claimed first: same priority, older) is started and cut off twice, then started a third time.
    for _ in range(2):
        assert store.claim_job().id == 1
        store.requeue_interrupted(max_attempts=99)
    assert store.claim_job().id == 1
    assert store.claim_job().id == 2  # started once
    requeued, failed = store.requeue_interrupted(max_attempts=3)
    assert [j.id for j in failed] == [1] and "interrupted 3 times" in failed[0].error
    assert store.get_job(1).state == JobState.FAILED
    assert [j.id for j in requeued] == [2] and store.get_job(2).state == JobState.QUEUED
    store.close()
