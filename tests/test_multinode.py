"""Two node processes sharing one PostgreSQL store and one spool: every job runs exactly once, and a node
killed with kill -9 mid-job has its job finished by the other (takeover)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import psycopg
import pytest

from node.synth import write_chest_ct
from tests.support.pipeline import result_instances, send
from tests.support.wait import wait_until

SLOW = {"entry": "tests.plugins.slow_sr:SlowSrPlugin", "options": {"seconds": 3}}


def small_ct(tmp_path, name: str, seed: int):
    return write_chest_ct(tmp_path / name, slices=10, rows=64, cols=64, pixel_spacing=5.6, seed=seed)


def shared_config(orthanc, pg_url: str, shared, ae: str) -> dict:
    return {
        "node": {"ae_title": ae},
        "storage": {"database": pg_url, "spool_dir": str(shared / "spool"), "results_dir": str(shared / "results")},
        "assemble": {"quiet_period_s": 1.0},
        "run": {"workers": 1, "takeover_after_s": 3},
        "plugins": {"slow": SLOW},
        "destinations": {"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
                                  "timeout_s": 5}},
        "rules": [{"name": "slow", "series": {"modality": "CT"}, "plugin": "slow", "destinations": ["pacs"]}],
    }


def start_node(node_factory, cfg: dict, name: str):
    n = node_factory(cfg, name=name, start=False)
    n.ae_title = cfg["node"]["ae_title"]
    return n.start()


def jobs(pg_url: str) -> dict[int, tuple]:
    """{job id: (study, state, attempts, owner)} straight from PostgreSQL."""
    with psycopg.connect(pg_url) as conn:
        return {r[0]: r[1:] for r in conn.execute("SELECT id, study_uid, state, attempts, owner FROM jobs")}


def starts(*nodes) -> list[tuple[str, int]]:
    return [(n.ae_title, r["job_id"]) for n in nodes for r in n.audit_records() if r["event"] == "job-start"]


@pytest.fixture
def pair(tmp_path, orthanc, node_factory, pg_url, test_plugins):
    shared = tmp_path / "shared"
    a = start_node(node_factory, shared_config(orthanc, pg_url, shared, "AINODE1"), "a")
    b = start_node(node_factory, shared_config(orthanc, pg_url, shared, "AINODE2"), "b")
    return a, b


def test_two_nodes_share_the_work_and_run_every_job_once(tmp_path, orthanc, pg_url, pair):
    a, b = pair
    assert a.audit_path != b.audit_path
    node_starts = [r for n in pair for r in n.audit_records() if r["event"] == "node-start"]
    assert sum(1 for r in node_starts if r.get("reconcile_skipped_for")) == 1  # the second to start skipped it
    cts = [small_ct(tmp_path, f"ct{i}", seed=i) for i in range(6)]
    for i, ct in enumerate(cts):
        send(a if i % 2 == 0 else b, ct.files)
    send(b, cts[0].files)  # the same study through the other receiver too: nothing is counted twice

    wait_until(lambda: len(jobs(pg_url)) == 6 and all(j[1] == "dispatched" for j in jobs(pg_url).values()),
               90, "6 jobs dispatched")
    started = starts(a, b)
    assert sorted(Counter(j for _, j in started).values()) == [1] * 6, started  # each job ran once, in one node
    assert {ae for ae, _ in started} == {"AINODE1", "AINODE2"}  # both nodes ran jobs
    assert all(attempts == 1 for _, _, attempts, _ in jobs(pg_url).values())
    for ct in cts:
        wait_until(lambda ct=ct: result_instances(orthanc, ct.study_uid) == {"SR": 1}, 30, "SR in Orthanc")
    with psycopg.connect(pg_url) as conn:
        counts = dict(conn.execute("SELECT study_uid, instance_count FROM studies").fetchall())
    assert counts == {ct.study_uid: len(ct.files) for ct in cts}
    sent = Counter(r["sop_instance_uid"] for n in pair for r in n.audit_records() if r["event"] == "object-sent")
    assert len(sent) == 6 and set(sent.values()) == {1}  # each result sent once, by one of the two
    for n in pair:
        assert n.cli("audit", "verify", "--config", str(n.config_path)).returncode == 0


def test_kill_9_of_one_node_mid_job_the_other_finishes_it(tmp_path, orthanc, pg_url, pair):
    a, b = pair
    ct = small_ct(tmp_path, "ct", seed=7)
    send(a, ct.files)
    wait_until(lambda: any(r["event"] == "job-start" for r in a.audit_records())
               or any(r["event"] == "job-start" for r in b.audit_records()), 60, "job-start", interval=0.05)
    victim, survivor = (a, b) if any(r["event"] == "job-start" for r in a.audit_records()) else (b, a)
    [(job_id, (_, state, _, owner))] = jobs(pg_url).items()
    assert state == "running"
    os.killpg(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(10)
    killed_at = time.monotonic()

    takeover = wait_until(lambda: next((r for r in survivor.audit_records() if r["event"] == "job-takeover"), None),
                          30, "job-takeover")
    assert takeover["job_id"] == job_id and takeover["from_instance"] == owner
    assert takeover["result"] == "requeued" and takeover["from_pid"] == victim.proc.pid
    wait_until(lambda: jobs(pg_url)[job_id][1] == "dispatched", 60, "the job dispatched by the survivor")
    took_s = time.monotonic() - killed_at
    _, state, attempts, new_owner = jobs(pg_url)[job_id]
    assert attempts == 2 and new_owner == takeover["by_instance"] != owner
    assert [j for ae, j in starts(survivor)] == [job_id]
    assert any(r["event"] == "job-end" and r["job_id"] == job_id for r in survivor.audit_records())
    wait_until(lambda: result_instances(orthanc, ct.study_uid) == {"SR": 1}, 30, "SR in Orthanc")
    time.sleep(1)
    assert result_instances(orthanc, ct.study_uid) == {"SR": 1}
    print(f"takeover to dispatched: {took_s:.1f}s")
