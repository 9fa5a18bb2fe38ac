"""What the node's log says about senders, for the IT staff who read it: a sender that drops its connection
or aborts gets one warning naming its AE title, not pynetdicom's errors and traceback; refused presentation
contexts are warned once per calling AE and set of classes, while the audit log keeps every association."""

from __future__ import annotations

import socket
import struct
import time
from typing import Iterator

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.support.node_proc import NodeProcess
from tests.support.wait import wait_until

PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.7433.99.1"  # no such storage class: refused at negotiation
ENDED = "association ended without release"


@pytest.fixture
def node(tmp_path) -> Iterator[NodeProcess]:
    with NodeProcess(tmp_path, {"assemble": {"quiet_period_s": 3600}}) as n:
        yield n


def _associate(node: NodeProcess, ae_title: str, contexts: list[str]):
    ae = AE(ae_title=ae_title)
    for sop_class in contexts:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    return assoc


def _log(node: NodeProcess) -> str:
    return node.log_path.read_text(errors="replace")


def _ended(node: NodeProcess, calling: str) -> list[str]:
    return [line for line in _log(node).splitlines() if ENDED in line and f"calling_ae={calling} " in line]


def test_a_dropped_or_aborted_association_is_one_warning_without_a_traceback(node):
    # A sender that dies mid-PDU: half a P-DATA-TF on the wire, then a reset (SO_LINGER 0).
    dropped = _associate(node, "DROPPER", [CTImageStorage])
    raw = dropped.dul.socket.socket
    raw.sendall(struct.pack(">BBL", 0x04, 0, 1000) + b"\x00" * 10)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()
    line = wait_until(lambda: _ended(node, "DROPPER"), 10, "the warning for the dropped association")
    assert len(line) == 1 and "level=WARNING" in line[0] and "ip=127.0.0.1" in line[0]
    dropped.abort()  # ends the test's own side of it

    aborted = _associate(node, "ABORTER", [CTImageStorage])
    aborted.abort()
    line = wait_until(lambda: _ended(node, "ABORTER"), 10, "the warning for the aborted association")
    assert len(line) == 1

    released = _associate(node, "RELEASER", [Verification])
    assert int(released.send_c_echo().Status) == 0x0000
    released.release()
    wait_until(lambda: [r for r in node.audit_records() if r.get("calling_ae") == "RELEASER"], 10, "RELEASER's record")
    time.sleep(3.0)  # the node decides once the association's thread has ended: well within this

    log = _log(node)
    assert not _ended(node, "RELEASER")
    assert "Traceback" not in log
    assert "level=ERROR" not in log, log


def test_refused_contexts_are_warned_once_per_calling_ae_and_audited_every_time(node):
    for _ in range(3):
        assoc = _associate(node, "PROPOSER", [CTImageStorage, PRIVATE_SOP_CLASS])
        assoc.release()
    def refusals() -> list[dict]:
        return [r for r in node.audit_records()
                if r["event"] == "presentation-context-refused" and r["calling_ae"] == "PROPOSER"]

    records = wait_until(lambda: refusals() if len(refusals()) >= 3 else None, 10, "three refusal records")
    assert len(records) == 3 and all(r["sop_classes"] == [PRIVATE_SOP_CLASS] for r in records)
    warned = [line for line in _log(node).splitlines()
              if "presentation contexts refused calling_ae=PROPOSER" in line and "level=WARNING" in line]
    assert len(warned) == 1, warned

    other = _associate(node, "OTHER", [CTImageStorage, PRIVATE_SOP_CLASS])  # another sender is warned too
    other.release()
    wait_until(lambda: [line for line in _log(node).splitlines()
                        if "presentation contexts refused calling_ae=OTHER" in line], 10, "OTHER's warning")


def test_pynetdicoms_lost_connection_errors_are_dropped_and_nothing_else():
    """pynetdicom's own reader (used outside the node's P-DATA path, e.g. while an association is being
    negotiated or released) logs the same loss as errors and a traceback: the log filter drops exactly those."""
    import logging

    from node.logs import DropLostConnectionErrors

    def record(name: str, msg: object, exc: BaseException | None = None) -> logging.LogRecord:
        exc_info = (type(exc), exc, None) if exc is not None else None
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, exc_info)

    keep = DropLostConnectionErrors().filter
    reset = ConnectionResetError(104, "Connection reset by peer")
    assert not keep(record("pynetdicom.dul", "Connection closed before the entire PDU was received"))
    assert not keep(record("pynetdicom.dul", reset, reset))
    assert not keep(record("pynetdicom.dul", "The received PDU is shorter than expected (12 of 1006 bytes received)"))
    assert keep(record("pynetdicom.dul", "Unknown PDU type received '0x09'"))
    assert keep(record("pynetdicom.transport", "TCP Initialisation Error: [Errno 111] Connection refused"))
    assert keep(record("ainode.receive", "Connection closed before the entire PDU was received"))
    assert keep(record("pynetdicom.dul", ValueError("bad"), ValueError("bad")))


def test_a_release_handled_late_on_a_busy_machine_is_no_warning(caplog):
    """The close can reach the node before the association thread has handled the A-RELEASE, and on a busy
    machine that thread can take a while: the check waits for the thread to end."""
    import logging
    import threading

    from node.receive import scp

    class LateRelease(threading.Thread):  # stands in for a pynetdicom Association (a Thread) that is slow
        is_released = False

        def run(self) -> None:
            time.sleep(0.5)
            self.is_released = True

    late = LateRelease()
    late.start()
    with caplog.at_level(logging.WARNING, logger="ainode.receive"):
        scp.StoreSCP._warn_if_not_released(late, ("RELEASER", "127.0.0.1", 104))
    assert ENDED not in caplog.text

    class Dropped(threading.Thread):
        is_released = False

        def run(self) -> None:
            pass

    dropped = Dropped()
    dropped.start()
    with caplog.at_level(logging.WARNING, logger="ainode.receive"):
        scp.StoreSCP._warn_if_not_released(dropped, ("DROPPER", "127.0.0.1", 104))
    assert f"{ENDED} " in caplog.text and "calling_ae=DROPPER " in caplog.text
