"""SIGTERM: stop accepting, let open associations and running jobs finish (or queue them again), exit 0."""

import signal
import subprocess
import time

from node.synth import write_chest_ct
from tests.support.pipeline import events, lung_config, query, result_instances, send, status
from tests.support.wait import wait_until


def test_sigterm_mid_association_and_mid_job_loses_nothing(tmp_path, orthanc, node_factory):
    first = write_chest_ct(tmp_path / "first", slices=60, slice_thickness=5.0, seed=1)
    second = write_chest_ct(tmp_path / "second", slices=150, slice_thickness=2.0, seed=2)
    node = node_factory(lung_config(orthanc))
    send(node, first.files)
    wait_until(lambda: "job stage job_id=1 stage=plugin" in node.log_path.read_text(), 60, "the job to run", 0.02)
    sender = subprocess.Popen(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                               *map(str, second.files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: sum(r.get("study_uid") == second.study_uid for r in events(node, "instance-stored")) >= 10,
               60, "the second study to be arriving", 0.02)
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(60) == 0
    assert sender.wait(60) == 0, sender.stdout.read()  # the open association ran to its end
    held = query(node, "SELECT count(*) FROM instances WHERE study_uid = ?", second.study_uid)[0][0]
    assert held == len(second.files)
    assert query(node, "SELECT state FROM jobs WHERE id = 1")[0][0] in ("results-built", "dispatched")
    assert events(node, "node-stop")[-1]["clean"] is True

    node.start()
    for s in (first, second):
        wait_until(lambda: result_instances(orthanc, s.study_uid) == {"SEG": 1, "SR": 1}, 120, "results")
    wait_until(lambda: status(node).count("state=dispatched") == 2, 30, "both dispatched")


def test_sigterm_with_a_job_past_the_grace_time_requeues_it_without_using_an_attempt(
        tmp_path, node_factory, test_plugins):
    ct = write_chest_ct(tmp_path / "ct", slices=20, slice_thickness=5.0, rows=128, cols=128)
    node = node_factory({
        "run": {"shutdown_grace_s": 1},
        "plugins": {"slow": {"entry": "tests.plugins.misbehaving:HangPlugin", "options": {"seconds": 8}}},
        "rules": [{"name": "slow", "series": {"modality": "CT"}, "plugin": "slow"}],
    })
    send(node, ct.files)
    wait_until(lambda: events(node, "job-start"), 60, "the job to start", 0.05)
    t = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(30) == 0
    assert time.monotonic() - t < 8, "the node waited for the job instead of its grace time"
    [cut] = [r for r in events(node, "job-end") if r["outcome"] == "interrupted"]
    assert cut["job_id"] == 1
    assert query(node, "SELECT state, attempts FROM jobs") == [("queued", 0)]
    assert events(node, "node-stop")[-1]["clean"] is False
    # the worker killed mid-job held no named semaphores for the resource tracker to warn about
    assert "leaked semaphore" not in node.log_path.read_text(errors="replace")

    node.start()
    wait_until(lambda: "state=done-no-destination" in status(node), 60, "the job to run again and finish")
    assert query(node, "SELECT attempts FROM jobs") == [(1,)]


def test_sigusr1_writes_every_threads_stack_to_the_log_and_the_node_carries_on(node_factory):
    node = node_factory({"assemble": {"quiet_period_s": 3600}})
    node.proc.send_signal(signal.SIGUSR1)
    def stacks():  # type: ignore[no-untyped-def]
        text = node.log_path.read_text(errors="replace")
        return text if 'File "' in text and "cli.py" in text else None

    log = wait_until(stacks, 20, "the thread stacks in the node's log")
    assert log.count("Thread 0x") >= 2  # the main thread and the node's own (receive, assemble, ...)
    assert node.proc.poll() is None
    assert node.stop() == 0
