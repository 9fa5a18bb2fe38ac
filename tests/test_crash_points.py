"""kill -9 at each stage while a study flows, then restart.

The kill points are chosen from the node's own state (its audit log, its log lines, its store).
After the restart: every instance acknowledged before the kill is held, the study reaches
dispatched, and Orthanc holds exactly one SEG and one SR.
"""

import os
import signal
import subprocess
import time

import pytest

from node.synth import write_chest_ct
from tests.support.pipeline import events, lung_config, query, result_instances, send, status
from tests.support.relay import StallingRelay
from tests.support.wait import wait_until

POINTS = ["receive", "quiet-period", "load", "plugin", "build", "results-built", "dispatch"]


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return write_chest_ct(tmp_path_factory.mktemp("ct"), slices=120, slice_thickness=2.5)


def logged(node, text):
    return text in node.log_path.read_text(errors="replace")


def kill_9(node):
    """SIGKILL the node process alone, as the kernel or an operator would; its worker must die with it."""
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(10)


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_then_restart_loses_nothing_and_dispatches_once(point, ct, request, orthanc, node_factory):
    cfg = lung_config(orthanc)
    if point == "dispatch":  # through a PACS front that takes the first object, then never answers
        relay = StallingRelay(orthanc).__enter__()
        request.addfinalizer(lambda: relay.__exit__(None))
        cfg["destinations"]["pacs"].update(ae_title=relay.aet, port=relay.port)
    cfg["assemble"] = {"quiet_period_s": 3.0 if point in ("quiet-period", "receive") else 1.0, "poll_interval_s": 0.1}
    node = node_factory(cfg)
    fast = 0.02
    if point == "receive":
        sender = subprocess.Popen(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                                   *map(str, ct.files)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: len(events(node, "instance-stored")) >= 40, 60, "40 instances stored", fast)
        kill_9(node)
        assert sender.wait(60) != 0  # the sender saw the association drop
    else:
        send(node, ct.files)
        if point in ("load", "plugin", "build"):
            wait_until(lambda: logged(node, f"job stage job_id=1 stage={point}"), 60, f"stage {point}", fast)
        elif point == "results-built":
            wait_until(lambda: events(node, "job-end"), 60, "job-end", fast)
        elif point == "dispatch":
            wait_until(relay.stalled.is_set, 60, "the PACS to hold the first result object", fast)
        kill_9(node)

    acknowledged = {r["sop_instance_uid"] for r in events(node, "instance-stored")}
    studies = query(node, "SELECT state FROM studies")
    jobs = query(node, "SELECT state FROM jobs")
    # Where the kill landed, from the store: the evidence that each point is a different state.
    if point == "receive":
        assert 40 <= len(acknowledged) < len(ct.files) and studies == [("receiving",)]
    elif point == "quiet-period":
        assert len(acknowledged) == len(ct.files) and studies == [("receiving",)] and jobs == []
    elif point in ("load", "plugin", "build"):
        assert jobs == [("running",)]
    elif point == "results-built":
        assert jobs[0][0] in ("results-built", "dispatched")
    elif point == "dispatch":  # the PACS holds one object, the node has recorded none as sent
        assert jobs == [("results-built",)] and sum(result_instances(orthanc, ct.study_uid).values()) == 1
        assert query(node, "SELECT DISTINCT state FROM dispatches") == [("pending",)]
    if point in ("load", "plugin", "build"):
        pid = int(node.log_path.read_text().split("worker_pid=")[1].split()[0])
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the orphaned worker process to exit")

    node.start()
    if point == "receive":
        send(node, ct.files)  # the PACS sends again what was not acknowledged
    wait_until(lambda: result_instances(orthanc, ct.study_uid) == {"SEG": 1, "SR": 1}, 120, "SEG and SR in PACS")
    wait_until(lambda: "state=dispatched" in status(node), 30, "dispatched")
    assert query(node, "SELECT state FROM jobs") == [("dispatched",)]  # one job, on the whole study

    held = dict(query(node, "SELECT sop_instance_uid, path FROM instances"))
    assert acknowledged <= set(held) and len(held) == len(ct.files)
    assert all(os.path.exists(p) for p in held.values())
    assert not list((node.var / "spool" / ".tmp").iterdir())  # no half-written file survives
    if point in ("load", "plugin", "build"):
        assert events(node, "node-start")[-1]["jobs_requeued"] == [1]
    time.sleep(1.5)  # anything still to be re-sent would have gone out by now
    assert result_instances(orthanc, ct.study_uid) == {"SEG": 1, "SR": 1}
    assert node.cli("audit", "verify", "--config", str(node.config_path)).returncode == 0
