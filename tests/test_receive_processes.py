"""node.receive_processes: several processes take associations on one port; the node process indexes and
audits every instance, and the receive processes die with it."""

import os
import signal
import subprocess
from pathlib import Path
from collections import Counter
from contextlib import ExitStack

import pytest

from pydantic import ValidationError
from pydicom import dcmread

from node.config.schema import NodeConfig
from node.synth import write_chest_ct
from tests.support.pipeline import events, held_association, query, send
from tests.support.shm import named_semaphores
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return write_chest_ct(tmp_path_factory.mktemp("ct"), slices=32, rows=64, cols=64, slice_thickness=2.5)


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "multiprocessing.spawn" in line]


def connections(port: int) -> list[str]:
    """IPv4 TCP connections on the node's port that the node has not closed yet: established, or closed by
    the peer only (the kernel's table; states 01 and 08)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return [r for r in rows if r.split()[1].endswith(f":{port:04X}") and r.split()[3] in ("01", "08")]


def takers(node, count: int) -> dict[str, int]:
    """{calling AE title: pid of the process that accepted it}, once `count` associations are audited (a
    receive process audits through the node process, after the sender is told it is accepted)."""
    wait_until(lambda: len(events(node, "association-accepted")) >= count, 10, "association records")
    return {r["calling_ae"]: r["receiver_pid"] for r in events(node, "association-accepted")}


def test_associations_spread_over_processes_and_every_instance_is_indexed_once(ct, node_factory):
    node = node_factory({"node": {"receive_processes": 2, "max_associations": 20}, "assemble": {"quiet_period_s": 60}})
    wait_until(lambda: "receive processes listening" in node.log_path.read_text(), 60, "receive processes")
    groups = [ct.files[i::12] for i in range(12)]
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
    # commit (it skips the look-up that would be another round trip) and leaves no second file. The held
    # association is the node process's (it takes the first when idle), so the resends go to the other one
    # as long as they do not overlap.
    with held_association(node) as held:
        assert held.send_c_store(dcmread(ct.files[8])).Status == 0  # a duplicate in the node process
        resends = [subprocess.Popen(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), str(f)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for f in ct.files[:8]]
        for s in resends:
            assert s.wait(60) == 0, s.stderr.read()
    takers(node, 12 + 1 + 8)
    assert {r["receiver_pid"] for r in events(node, "association-accepted")[-9:]} == pids
    assert len(events(node, "instance-duplicate")) == 9
    assert len(list((node.var / "spool").rglob("*.dcm"))) == len(ct.files)
    extra = [p for p in pids if p != node.proc.pid]
    assert node.stop() == 0
    assert not any(os.path.exists(f"/proc/{p}") for p in extra)


def test_associations_are_taken_in_turns(ct, node_factory):
    """The process with the fewest open connections takes the next one: 4 associations land 2:2 on 2
    processes, always (the kernel's SO_REUSEPORT hash split them 2:2 in only 40% of tries), and one
    association on an idle node goes to the node process."""
    node = node_factory({"node": {"receive_processes": 2}})
    wait_until(lambda: "receive processes listening" in node.log_path.read_text(), 60, "receive processes")
    with held_association(node, "ALONE"):
        pass
    wait_until(lambda: not connections(node.port), 10, "the node to close the connection")
    with ExitStack() as stack:
        for i in range(4):
            stack.enter_context(held_association(node, f"HOLD{i}"))
    taken = takers(node, 5)
    assert taken["ALONE"] == node.proc.pid
    held = Counter(pid for ae, pid in taken.items() if ae.startswith("HOLD"))
    assert sorted(held.values()) == [2, 2] and node.proc.pid in held
    # Closed connections are counted off: the next burst is split evenly again.
    wait_until(lambda: not connections(node.port), 10, "the node to close the connections")
    with ExitStack() as stack:
        for i in range(2):
            stack.enter_context(held_association(node, f"AGAIN{i}"))
    taken = takers(node, 7)
    assert taken["AGAIN0"] != taken["AGAIN1"]


def test_a_receive_process_that_dies_is_replaced(ct, node_factory):
    """It takes no more turns while it is gone (the node process takes the associations), and another
    receive process starts in its place, which takes its turns again."""
    node = node_factory({"node": {"receive_processes": 2}})
    wait_until(lambda: "receive processes listening" in node.log_path.read_text(), 60, "receive processes")
    with held_association(node, "FIRST"), held_association(node, "SECOND"):
        pass
    child = takers(node, 2)["SECOND"]
    assert child != node.proc.pid
    os.kill(child, signal.SIGKILL)
    wait_until(lambda: "receive process exited" in node.log_path.read_text(), 10, "the exit logged")
    with ExitStack() as stack:
        for i in range(3):
            stack.enter_context(held_association(node, f"HOLD{i}"))
    assert child not in {takers(node, 5)[f"HOLD{i}"] for i in range(3)}
    send(node, ct.files[:4])
    wait_until(lambda: len(events(node, "instance-stored")) == 4, 10, "the instances stored")
    wait_until(lambda: "receive process restarted" in node.log_path.read_text(), 60, "a replacement")
    replacement = set(children(node.proc.pid)) - {child}  # the node's children now (workers too)
    wait_until(lambda: not connections(node.port), 15, "the held connections closed")
    with held_association(node, "AFTER1"), held_association(node, "AFTER2"):
        pass
    pids = takers(node, 7)
    assert pids["AFTER1"] == node.proc.pid  # a tie: the node process first
    assert pids["AFTER2"] not in (node.proc.pid, child) and pids["AFTER2"] in replacement
    send(node, ct.files[4:8])
    wait_until(lambda: len(events(node, "instance-stored")) == 8, 10, "the instances stored")
    assert node.stop() == 0
    assert not os.path.exists(f"/proc/{pids['AFTER2']}")


def test_receive_processes_die_with_a_killed_node(ct, node_factory):
    node = node_factory({"node": {"receive_processes": 3}})
    wait_until(lambda: "receive processes listening" in node.log_path.read_text(), 60, "receive processes")
    before = set(children(node.proc.pid))
    # No process of the node holds a named POSIX semaphore (a multiprocessing lock): a node killed with its
    # whole process group (systemd's KillMode=control-group after a stop timeout) would leave it in /dev/shm.
    for pid in (node.proc.pid, *before):
        assert named_semaphores(pid) == set(), pid
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


def test_receive_processes_default_to_one_per_usable_cpu_at_most_four_and_one_with_deid(monkeypatch):
    from node.config import schema

    for cpus, expected in ((1, 1), (2, 2), (16, 4)):
        monkeypatch.setattr(schema, "usable_cpus", lambda cpus=cpus: cpus)
        assert NodeConfig().node.receive_processes == "auto"
        assert NodeConfig().receive_process_count() == expected
        assert NodeConfig.model_validate({"deid": {"key_file": "/x/key"}}).receive_process_count() == 1
        assert NodeConfig.model_validate({"node": {"receive_processes": 3}}).receive_process_count() == 3
    with pytest.raises(ValidationError, match="receive_processes"):
        NodeConfig.model_validate({"node": {"receive_processes": "two"}})
