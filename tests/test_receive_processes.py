"""node.receive_processes: several processes take associations on one port; the node process indexes and
audits every instance, and the receive processes die with it."""

import os
import signal
import subprocess

import pytest

from pydantic import ValidationError

from node.config.schema import NodeConfig
from node.synth import write_chest_ct
from tests.support.pipeline import events, query
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return write_chest_ct(tmp_path_factory.mktemp("ct"), slices=32, rows=64, cols=64, slice_thickness=2.5)


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "multiprocessing.spawn" in line]


def test_associations_spread_over_processes_and_every_instance_is_indexed_once(ct, node_factory):
    node = node_factory({"node": {"receive_processes": 2, "max_associations": 20}, "assemble": {"quiet_period_s": 60}})
    wait_until(lambda: "receive processes listening" in node.log_path.read_text(), 60, "receive processes")
    groups = [ct.files[i::12] for i in range(12)]  # all 12 on one process: p = 2^-11
    senders = [subprocess.Popen(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), *map(str, g)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for g in groups]
    for s in senders:
        assert s.wait(120) == 0, s.stderr.read()
    wait_until(lambda: len(events(node, "instance-stored")) == len(ct.files), 30, "every instance audited")
    pids = {r["receiver_pid"] for r in events(node, "association-accepted")}
    assert len(pids) == 2 and node.proc.pid in pids  # the node process and one receive process
    assert query(node, "SELECT count(*), count(DISTINCT sop_instance_uid) FROM instances") == [(32, 32)]
    assert query(node, "SELECT instance_count FROM studies") == [(32,)]
    assert all(os.path.exists(p) for (p,) in query(node, "SELECT path FROM instances"))
    assert node.cli("audit", "verify", "--config", str(node.config_path)).returncode == 0
    # A resend is answered as duplicates, whichever process takes it; a receive process finds them in its
    # commit (it skips the look-up that would be another round trip) and leaves no second file.
    resends = [subprocess.Popen(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), str(f)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for f in ct.files[:8]]
    for s in resends:  # 8 associations: all on one process with p = 2^-7
        assert s.wait(60) == 0, s.stderr.read()
    assert {r["receiver_pid"] for r in events(node, "association-accepted")[-8:]} == pids
    assert len(events(node, "instance-duplicate")) == 8
    assert len(list((node.var / "spool").rglob("*.dcm"))) == len(ct.files)
    extra = [p for p in pids if p != node.proc.pid]
    assert node.stop() == 0
    assert not any(os.path.exists(f"/proc/{p}") for p in extra)


def test_receive_processes_die_with_a_killed_node(ct, node_factory):
    node = node_factory({"node": {"receive_processes": 3}})
    wait_until(lambda: "receive processes listening" in node.log_path.read_text(), 60, "receive processes")
    before = set(children(node.proc.pid))
    os.kill(node.proc.pid, signal.SIGKILL)
    node.proc.wait(10)
    wait_until(lambda: not any(os.path.exists(f"/proc/{p}") and
                               open(f"/proc/{p}/stat").read().split(")")[1].split()[0] != "Z" for p in before),
               20, "every child of the node to exit")
    r = subprocess.run(["echoscu", "-aec", node.ae_title, "127.0.0.1", str(node.port)], capture_output=True,
                       timeout=30)
    assert r.returncode != 0  # nobody listens on the port any more


def test_receive_processes_with_deid_is_a_config_error():
    with pytest.raises(ValidationError, match="node.receive_processes > 1 cannot be combined with deid"):
        NodeConfig.model_validate({"node": {"receive_processes": 2}, "deid": {"key_file": "/x/key"}})
