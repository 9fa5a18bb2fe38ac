"""Studies sent again: unchanged → no re-run; with new images → one re-run whose results replace the first.

And retention: a study's images are deleted only after its results were dispatched.
"""

import time

from node.synth import write_chest_ct
from tests.support.pipeline import events, lung_config, query, result_instances, send, status
from tests.support.wait import wait_until


def result_uids(orthanc, study_uid):
    study = orthanc.find_study(study_uid)
    return sorted(i["MainDicomTags"]["SOPInstanceUID"] for s in orthanc.series_of_study(study)
                  if s["MainDicomTags"].get("Modality") in ("SEG", "SR") for i in orthanc.instances_of_series(s["ID"]))


def test_unchanged_study_is_not_rerun_and_new_images_rerun_with_the_same_uids(tmp_path, orthanc, node_factory):
    ct = write_chest_ct(tmp_path / "ct", slices=60, slice_thickness=5.0)
    first, late = ct.files[:50], ct.files[50:]
    node = node_factory(lung_config(orthanc))
    send(node, first)
    wait_until(lambda: result_instances(orthanc, ct.study_uid) == {"SEG": 1, "SR": 1}, 90, "first results")
    wait_until(lambda: "state=dispatched" in status(node), 30, "dispatched")
    uids = result_uids(orthanc, ct.study_uid)

    send(node, first)  # the PACS sends the same study again
    time.sleep(3)  # three quiet periods
    assert len(events(node, "instance-duplicate")) == 50
    assert len(events(node, "job-start")) == 1, "an unchanged study must not run again"
    assert query(node, "SELECT state, revision FROM studies") == [("routed", 0)]

    send(node, late)  # new images after completion: the study is assembled and routed again
    wait_until(lambda: len(events(node, "job-end")) == 2, 90, "the second run")
    wait_until(lambda: status(node).count("state=dispatched") == 2, 30, "second dispatch")
    assert query(node, "SELECT revision, instance_count FROM studies") == [(1, 60)]
    jobs = query(node, "SELECT id, series_uids FROM jobs ORDER BY id")
    assert len(jobs) == 2 and jobs[0][1] == jobs[1][1]
    # Same plugin version, same inputs' series: same UIDs, so the PACS replaced the first results.
    assert result_instances(orthanc, ct.study_uid) == {"SEG": 1, "SR": 1}
    assert result_uids(orthanc, ct.study_uid) == uids
    ends = events(node, "job-end")
    assert {o["sop_instance_uid"] for o in ends[0]["outputs"]} == {o["sop_instance_uid"] for o in ends[1]["outputs"]}


def test_retention_purges_only_dispatched_studies(tmp_path, orthanc, node_factory):
    good = write_chest_ct(tmp_path / "good", slices=40, slice_thickness=5.0, seed=1)
    kept = write_chest_ct(tmp_path / "kept", slices=40, slice_thickness=5.0, seed=2)
    cfg = lung_config(orthanc)
    cfg["destinations"]["nowhere"] = {"ae_title": "NOBODY", "host": "127.0.0.1", "port": 9, "max_attempts": 1,
                                      "timeout_s": 2}
    cfg["rules"] = [
        {"name": "good", "study": {"calling_ae": "GOOD"}, "plugin": "ct_lung", "destinations": ["pacs"]},
        {"name": "kept", "study": {"calling_ae": "KEPT"}, "plugin": "ct_lung", "destinations": ["nowhere"]},
    ]
    cfg["storage"] = {"retention_hours": 0, "purge_interval_s": 0.5}
    node = node_factory(cfg)
    send(node, good.files, calling="GOOD")
    send(node, kept.files, calling="KEPT")
    wait_until(lambda: events(node, "study-purged"), 90, "the dispatched study to be purged")
    wait_until(lambda: "state=dead-letter" in status(node), 60, "the other study's send to give up")
    time.sleep(1.5)  # purge runs every 0.5 s: the dead-letter study must survive it

    [purged] = events(node, "study-purged")
    assert purged["study_uid"] == good.study_uid and purged["files_removed"] == 40
    assert purged["result_files_removed"] == 2
    spool = node.var / "spool"
    assert not (spool / good.study_uid).exists()
    assert len(list((spool / kept.study_uid).rglob("*.dcm"))) == 40  # kept for `ainode requeue`
    assert not list((node.var / "results" / good.study_uid).rglob("*.dcm"))
    assert dict(query(node, "SELECT study_uid, state FROM studies")) == {good.study_uid: "purged",
                                                                        kept.study_uid: "routed"}

    # Sent again after its purge, the study is processed again; its results replace the first ones.
    send(node, good.files, calling="GOOD")
    wait_until(lambda: len(events(node, "study-purged")) == 2, 90, "the second run to be dispatched and purged")
    assert result_instances(orthanc, good.study_uid) == {"SEG": 1, "SR": 1}
    assert node.cli("audit", "verify", "--config", str(node.config_path)).returncode == 0


def test_a_study_is_purgeable_only_when_every_job_is_done_before_the_cutoff(tmp_path):
    from node.store import DispatchItem, NewJob, Store
    from node.store.db import InstanceMeta

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for uid, jobs in (("1.1", 2), ("1.2", 2), ("1.3", 0)):
        store.add_instance(InstanceMeta(f"{uid}.9", "1.2.840.10008.5.1.4.1.1.2", f"{uid}.5", uid,
                                        "1.2.840.10008.1.2.1", f"/x/{uid}", 1, "A"))
        store.mark_complete(uid, "quiet-period", time.time() + 1)
        store.route(uid, [NewJob(f"r{k}", "ct_lung", "routine", [f"{uid}.5"], []) for k in range(jobs)])
    while (job := store.claim_job()) is not None:  # every job ends with nowhere to send, except one of 1.2
        if job.study_uid == "1.2" and job.rule == "r1":
            store.job_results_built(job.id, "1", "", {}, [DispatchItem("pacs", "SR", "1.2.840.10008.5.1.4.1.1.88.34",
                                                                        "1.2.3", "/r")])
        else:
            store.job_results_built(job.id, "1", "", {}, [])
    assert store.purgeable_studies(time.time() - 3600) == []  # not yet past retention
    assert sorted(store.purgeable_studies(time.time() + 1)) == ["1.1", "1.3"]  # 1.2 has a send pending
    assert store.purge_study("1.2", time.time() + 1) == []
    assert store.purge_study("1.1", time.time() + 1) == ["/x/1.1"]
    assert store.purgeable_studies(time.time() + 1) == ["1.3"]
    store.close()
