"""A destination down past its attempts: dead-letter, never dropped; `ainode requeue` sends again."""

from node.synth import write_chest_ct
from tests.support.pipeline import events, lung_config, result_instances, send, status
from tests.support.wait import wait_until


def test_dead_letter_then_requeue_delivers_exactly_once(tmp_path, orthanc, node_factory):
    ct = write_chest_ct(tmp_path / "ct", slices=60, slice_thickness=5.0)
    node = node_factory(lung_config(orthanc, max_attempts=2, backoff_initial_s=0.2))
    cfg = str(node.config_path)
    orthanc.stop()
    send(node, ct.files)
    wait_until(lambda: "state=dead-letter" in status(node), 90, "the job to go dead-letter")
    fails = events(node, "send-failed")
    assert sorted({r["attempt"] for r in fails}) == [1, 2] and all(r["final"] for r in fails if r["attempt"] == 2)
    assert "dead-letter=2" in status(node)  # SEG and SR, each kept, not dropped
    # IT's log: a warning per object while it will be tried again, an error with what to do once it will not.
    log = node.log_path.read_text().splitlines()
    retried = [line for line in log if "level=WARNING" in line and "send failed dest=pacs" in line]
    gave_up = [line for line in log if "level=ERROR" in line and "send failed, gave up (dead-letter)" in line]
    assert sorted(k for line in retried for k in ("SEG", "SR") if f"kind={k} " in line) == ["SEG", "SR"]
    assert len(gave_up) == 2 and all("ainode requeue --job 1" in line for line in gave_up)

    r = node.cli("requeue", "--config", cfg, "--job", "99")
    assert r.returncode == 1 and "no job 99" in r.stderr

    orthanc.start()
    r = node.cli("requeue", "--config", cfg, "--study", ct.study_uid)
    assert r.returncode == 0, r.stderr
    assert "job 1: 2 dead-letter object(s) queued for sending again" in r.stdout
    wait_until(lambda: result_instances(orthanc, ct.study_uid) == {"SEG": 1, "SR": 1}, 60, "results after requeue")
    wait_until(lambda: "state=dispatched" in status(node), 30, "dispatched")

    [req] = events(node, "requeue")
    assert req["requested_by"] and req["resent"] == [{"job_id": 1, "study_uid": ct.study_uid, "objects": 2}]
    sent = events(node, "object-sent")
    assert len(sent) == 2 and all(r["attempt"] == 1 for r in sent)  # attempts start again from zero

    r = node.cli("requeue", "--config", cfg, "--job", "1")
    assert r.returncode == 1 and "job 1 is dispatched" in r.stderr
    r = node.cli("requeue", "--config", cfg, "--all")
    assert r.returncode == 0 and "nothing to requeue" in r.stdout
    assert node.cli("audit", "verify", "--config", cfg).returncode == 0
