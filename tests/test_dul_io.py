"""node/receive/dul_io.py: whole-PDU reads, and reactor waits that end when their work arrives.

The waits are checked with long limits (5 s) that end early: a wait that slept its whole length would
fail, a slow machine would not.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
import weakref
from types import SimpleNamespace

import pytest

from node.receive import dul_io

LONG = 5.0


@pytest.fixture
def pair():  # type: ignore[no-untyped-def]
    """Two connected sockets, both closed after the test (a closed one again harmlessly)."""
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _feed(sock: socket.socket, chunks: list[bytes], close: bool) -> threading.Thread:
    def run() -> None:
        for chunk in chunks:
            sock.sendall(chunk)
            time.sleep(0.01)
        if close:
            sock.close()

    t = threading.Thread(target=run)
    t.start()
    return t


def test_recv_returns_exactly_the_bytes_asked_for_across_partial_reads(pair):
    a, b = pair
    payload = bytes(range(256)) * 2048  # 512 KiB, sent in uneven pieces
    feeder = _feed(b, [payload[:1000], payload[1000:70000], payload[70000:]] + [b"next"], close=False)
    got = dul_io.recv(SimpleNamespace(socket=a), len(payload))
    assert isinstance(got, bytearray) and got == payload
    assert dul_io.recv(SimpleNamespace(socket=a), 4) == b"next"  # what was read ahead comes first
    feeder.join()


def test_recv_grows_its_buffer_as_bytes_arrive(monkeypatch, pair):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(dul_io, "PREALLOCATE", 1000)
    a, b = pair
    payload = bytes(range(256)) * 2048
    feeder = _feed(b, [payload[:700], payload[700:5000], payload[5000:]], close=False)
    assert dul_io.recv(SimpleNamespace(socket=a), len(payload)) == payload
    feeder.join()


def test_a_huge_announced_length_allocates_only_what_arrives(pair):
    """6 bytes announcing a 1.5 GB PDU made the node allocate 1.5 GB (RSS 151 -> 1582 MB), before any
    AE title or address check."""
    import tracemalloc

    a, b = pair
    feeder = _feed(b, [b"x" * 100], close=True)
    tracemalloc.start()
    try:
        got = dul_io.recv(SimpleNamespace(socket=a), 1_500_000_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    feeder.join()
    assert got == b"x" * 100
    assert peak < 2 * dul_io.PREALLOCATE + 2**20, peak


def test_recv_returns_what_came_before_the_peer_closed(pair):
    a, b = pair
    feeder = _feed(b, [b"abc", b"de"], close=True)
    got = dul_io.recv(SimpleNamespace(socket=a), 100)
    feeder.join()
    assert got == bytearray(b"abcde")


def _dul(sock: socket.socket) -> SimpleNamespace:
    return SimpleNamespace(socket=SimpleNamespace(socket=sock, _is_connected=True), to_provider_queue=queue.Queue())


def test_the_dul_wait_ends_when_the_socket_has_data(pair):
    a, b = pair
    threading.Timer(0.05, b.sendall, args=(b"x",)).start()
    t0 = time.monotonic()
    dul_io._dul_idle(_dul(a), LONG)
    assert time.monotonic() - t0 < LONG / 2


def test_the_dul_wait_is_a_plain_sleep_when_a_primitive_waits_or_the_socket_is_gone(pair):
    a, b = pair
    dul = _dul(a)
    dul.to_provider_queue.put("primitive")
    b.sendall(b"x")  # readable, but a queued primitive means the loop has work: it sleeps as before
    t0 = time.monotonic()
    dul_io._dul_idle(dul, 0.05)
    assert time.monotonic() - t0 >= 0.05
    closed = _dul(a)
    closed.socket._is_connected = False
    t0 = time.monotonic()
    dul_io._dul_idle(closed, 0.05)
    assert time.monotonic() - t0 >= 0.05


def test_the_association_wait_ends_when_a_message_is_queued():
    messages: queue.Queue = queue.Queue()
    assoc = SimpleNamespace(dimse=SimpleNamespace(msg_queue=messages), dul=SimpleNamespace(),
                            _reactor_checkpoint=threading.Event())
    assoc._reactor_checkpoint.set()
    threading.Timer(0.05, messages.put, args=((1, "C-STORE-RQ"),)).start()
    t0 = time.monotonic()
    dul_io._association_idle(assoc, LONG)
    assert time.monotonic() - t0 < LONG / 2
    assert messages.get_nowait() == (1, "C-STORE-RQ")  # the wait leaves the message for the loop


def test_sleeps_outside_the_two_reactor_loops_keep_their_length():
    import pynetdicom.association
    import pynetdicom.dul

    import node.receive.scp  # noqa: F401 - installs dul_io on import

    assert isinstance(pynetdicom.dul.time, dul_io._ReactorTime)
    assert isinstance(pynetdicom.association.time, dul_io._ReactorTime)
    t0 = time.monotonic()
    pynetdicom.association.time.sleep(0.05)
    assert time.monotonic() - t0 >= 0.05
    assert pynetdicom.dul.time.monotonic() > 0  # everything else is the time module's


def _echo_pair(monkeypatch):  # type: ignore[no-untyped-def]
    """A pynetdicom acceptor and an established association to it, with dul_io installed and IDLE_WAIT
    long: any hand-over that failed to wake its thread would stall an exchange for LONG seconds."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    import node.receive.scp  # noqa: F401 - installs dul_io on import
    from tests.support.net import free_port

    monkeypatch.setattr(dul_io, "IDLE_WAIT", LONG)
    ended = threading.Event()
    scp = AE(ae_title="WAKE_SCP")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_RELEASED, lambda e: ended.set()),
                                            (evt.EVT_ABORTED, lambda e: ended.set())])
    scu = AE(ae_title="WAKE_SCU")
    scu.add_requested_context(Verification)
    assoc = scu.associate("127.0.0.1", port, ae_title="WAKE_SCP")
    assert assoc.is_established
    return server, assoc, ended


def test_idle_reactors_wait_long_and_every_hand_over_wakes_them(monkeypatch):  # type: ignore[no-untyped-def]
    server, assoc, ended = _echo_pair(monkeypatch)
    try:
        calls = {"dul": 0, "association": 0}
        dul_idle, association_idle = dul_io._dul_idle, dul_io._association_idle

        def counting(name, fn):  # type: ignore[no-untyped-def]
            def wrapped(*args):  # type: ignore[no-untyped-def]
                calls[name] += 1
                return fn(*args)
            return wrapped

        monkeypatch.setattr(dul_io, "_dul_idle", counting("dul", dul_idle))
        monkeypatch.setattr(dul_io, "_association_idle", counting("association", association_idle))
        time.sleep(0.5)  # idle: 1 ms waits would be ~500 per thread; these last LONG unless woken
        assert calls["dul"] < 20 and calls["association"] < 20, calls
        t0 = time.monotonic()
        for _ in range(20):  # request read off the socket, message queued, response handed to the DUL
            assert assoc.send_c_echo().Status == 0x0000
        assoc.release()  # A-RELEASE queued for the acceptor's association, its reply handed to its DUL
        assert ended.wait(LONG / 2)
        assert time.monotonic() - t0 < LONG / 2
    finally:
        server.shutdown()


def test_an_abort_ends_the_acceptor_at_once_with_long_waits(monkeypatch):  # type: ignore[no-untyped-def]
    server, assoc, ended = _echo_pair(monkeypatch)
    try:
        time.sleep(0.1)
        t0 = time.monotonic()
        assoc.abort()
        assert ended.wait(LONG / 2)
    finally:
        server.shutdown()  # joins the acceptor's threads
    assert time.monotonic() - t0 < LONG / 2


def test_the_wakeup_is_closed_when_its_dul_thread_ends_and_late_pokes_are_dropped():
    wakeup = dul_io._Wakeup()
    wakeup.poke()
    assert select.select([wakeup], [], [], 0)[0]
    wakeup.drain()
    assert not select.select([wakeup], [], [], 0)[0]
    wakeup.close()
    wakeup.poke()  # after the close: no write to a descriptor number the process may have reused
    wakeup.close()


def test_without_a_descriptor_for_the_wakeup_the_association_keeps_the_short_waits(monkeypatch):  # type: ignore[no-untyped-def]
    def no_descriptor() -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(dul_io, "_Wakeup", no_descriptor)
    server, assoc, ended = _echo_pair(monkeypatch)
    try:
        assert assoc._reactor_checkpoint.wait.__name__ == "pause_or_pass"  # the pause window is closed here too
        t0 = time.monotonic()
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert ended.wait(LONG / 2)
        assert time.monotonic() - t0 < LONG / 2
    finally:
        server.shutdown()


def test_each_dul_closes_its_wakeup_when_its_association_ends():
    """Closed by the DUL thread itself, not by garbage collection: with gc off, 50 associations leave no
    descriptor behind."""
    import gc
    import os

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    import node.receive.scp  # noqa: F401 - installs dul_io on import
    from tests.support.net import free_port

    scp = AE(ae_title="FD_SCP")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    scu = AE(ae_title="FD_SCU")
    scu.add_requested_context(Verification)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        def one() -> None:
            assoc = scu.associate("127.0.0.1", port, ae_title="FD_SCP")
            assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
            assoc.release()

        one()
        time.sleep(0.3)
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(50):
            one()
        deadline = time.monotonic() + LONG
        while len(os.listdir("/proc/self/fd")) > before and time.monotonic() < deadline:
            time.sleep(0.05)  # the last DUL threads finish closing
        assert len(os.listdir("/proc/self/fd")) <= before
    finally:
        if was_enabled:
            gc.enable()
        server.shutdown()


def test_a_release_hint_survives_the_connection_closing_before_evt_released():
    """The A-RELEASE-RP wakes the sender, whose close the DUL thread may handle before the association thread
    raises EVT_RELEASED: the hint goes out once, from whichever handler comes first; an abort sends none."""
    from node.receive.scp import StoreSCP

    scp = StoreSCP.__new__(StoreSCP)  # only the two handlers and their bookkeeping
    scp._studies, scp._studies_lock = {}, threading.Lock()
    scp._accepted = weakref.WeakSet()  # none accepted here: no "ended without release" check
    hints: list[set[str]] = []
    scp.on_released = hints.append

    class Assoc:  # hashable, as the handlers key their bookkeeping by association
        def __init__(self, state: str, is_aborted: bool = False) -> None:
            self.dul = SimpleNamespace(state_machine=SimpleNamespace(current_state=state))
            self.is_released, self.is_aborted, self.is_rejected = False, is_aborted, False

    assoc = Assoc

    closing = assoc("Sta13")  # RP sent, peer closed, EVT_RELEASED not raised yet
    scp._studies[closing] = {"1.2.3"}
    scp._on_closed(SimpleNamespace(assoc=closing))
    scp._on_released(SimpleNamespace(assoc=closing))
    assert hints == [{"1.2.3"}]

    released = assoc("Sta13")  # the usual order: EVT_RELEASED first
    scp._studies[released] = {"4.5.6"}
    scp._on_released(SimpleNamespace(assoc=released))
    scp._on_closed(SimpleNamespace(assoc=released))
    assert hints == [{"1.2.3"}, {"4.5.6"}]

    dropped = assoc("Sta6")  # connection dropped mid-association
    aborted = assoc("Sta13", is_aborted=True)  # this node aborted
    for a in (dropped, aborted):
        scp._studies[a] = {"7.8.9"}
        scp._on_closed(SimpleNamespace(assoc=a))
    assert hints == [{"1.2.3"}, {"4.5.6"}] and not scp._studies


def test_a_loop_passing_the_checkpoint_is_never_seen_as_paused_by_a_sender():
    """pydicom/pynetdicom#875: a sender that cleared the checkpoint just after the loop found it set saw
    `_is_paused` True, sent, and the still-running loop could take its reply off the queue."""
    from types import SimpleNamespace

    assoc = SimpleNamespace(_reactor_checkpoint=threading.Event(), _is_paused=False)
    assoc._reactor_checkpoint.set()
    dul_io.close_pause_window(assoc)
    assoc._is_paused = True  # the loop, about to look at the checkpoint
    assert assoc._reactor_checkpoint.wait() is True  # set: the loop runs on ...
    assert assoc._is_paused is False  # ... and no sender that clears from now on takes it for paused
    assoc._reactor_checkpoint.clear()  # a sender
    assoc._is_paused = True  # the loop's next pass
    waiting = threading.Thread(target=assoc._reactor_checkpoint.wait)
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive() and assoc._is_paused is True  # now it is paused, and the sender may go on
    assoc._reactor_checkpoint.set()
    waiting.join(5)
    assert not waiting.is_alive()


def test_a_loop_woken_from_its_pause_stays_paused_for_the_next_sender():
    """The second window of pynetdicom#875 (a CI failure here, 2026-12): a loop paused in the checkpoint is
    woken by one sender's set, and the next sender clears before the loop runs on. That sender sees
    `_is_paused` True and sends; the loop must not then look at the queue until the sender is done."""
    checkpoint = threading.Event()
    assoc = SimpleNamespace(_reactor_checkpoint=checkpoint, _is_paused=False)
    real_wait = checkpoint.wait

    def descheduled_after_waking(timeout=None):  # type: ignore[no-untyped-def]
        got = real_wait(timeout)
        time.sleep(0.1)  # the window, made wide: the loop thread is not run right after its wake-up
        return got

    checkpoint.wait = descheduled_after_waking  # type: ignore[method-assign]
    dul_io.close_pause_window(assoc)
    checkpoint.clear()  # the first sender holds the loop paused
    sending = threading.Event()  # set while a sender relies on the loop being paused
    looks: list[bool] = []
    stop = threading.Event()

    def loop() -> None:  # pynetdicom's Association._run_reactor, reduced to its pause
        while not stop.is_set():
            assoc._is_paused = True
            checkpoint.wait()
            assoc._is_paused = False
            looks.append(sending.is_set())
            time.sleep(0.001)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        deadline = time.monotonic() + LONG
        while not assoc._is_paused and time.monotonic() < deadline:
            time.sleep(0.001)
        checkpoint.set()  # the first sender is done
        time.sleep(0.02)  # the loop has woken and not yet run on
        checkpoint.clear()  # the next sender
        while not assoc._is_paused:
            time.sleep(0.0001)
        sending.set()  # it sends and waits for its reply
        time.sleep(0.3)
        sending.clear()
        checkpoint.set()
        time.sleep(0.2)
    finally:
        stop.set()
        checkpoint.set()
        thread.join(LONG)
    assert looks and not any(looks), looks


def test_the_loop_pausing_itself_to_release_on_a_network_timeout_does_not_wait_on_itself():
    """pynetdicom's reactor, on a network timeout with network_timeout_response "A-RELEASE", sets
    `_is_paused`, waits on the checkpoint and calls release() from the loop thread; release() clears the
    checkpoint and waits for `_is_paused`. The loop's own clear must leave it True, or it spins for ever."""
    out: dict[str, bool] = {}

    class Loop(threading.Thread):  # the association thread: pynetdicom's Association is a Thread
        def run(self) -> None:
            self._is_paused = True
            self._reactor_checkpoint.wait()  # set: passes, and marks the loop as running on
            self._reactor_checkpoint.clear()  # release(), from the loop itself
            deadline = time.monotonic() + LONG
            while not self._is_paused and time.monotonic() < deadline:
                time.sleep(0.0001)
            out["paused"] = self._is_paused
            self._reactor_checkpoint.set()

    loop = Loop()
    loop._reactor_checkpoint = threading.Event()  # type: ignore[attr-defined]
    loop._reactor_checkpoint.set()  # type: ignore[attr-defined]
    loop._is_paused = False  # type: ignore[attr-defined]
    dul_io.close_pause_window(loop)
    loop.start()
    loop.join(LONG * 2)
    assert out == {"paused": True}
    other = threading.Thread(target=loop._reactor_checkpoint.clear)  # type: ignore[attr-defined]
    loop._is_paused = False  # type: ignore[attr-defined]
    other.start()
    other.join()
    assert loop._is_paused is False  # type: ignore[attr-defined] - a sender's clear does not mark the loop paused


def test_a_requestor_set_to_release_on_a_network_timeout_releases(monkeypatch):  # type: ignore[no-untyped-def]
    """The same, through pynetdicom: an idle association whose network timeout ends it with A-RELEASE."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    import node.receive.scp  # noqa: F401 - installs dul_io on import
    from tests.support.net import free_port

    released = threading.Event()
    scp = AE(ae_title="NT_SCP")
    scp.add_supported_context(Verification)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False,
                              evt_handlers=[(evt.EVT_RELEASED, lambda e: released.set())])
    try:
        scu = AE(ae_title="NT_SCU")
        scu.add_requested_context(Verification)
        scu.network_timeout = 0.5
        assoc = scu.associate("127.0.0.1", port, ae_title="NT_SCP")
        assert assoc.is_established
        assoc.network_timeout_response = "A-RELEASE"
        assert released.wait(LONG)  # the acceptor saw the requestor's A-RELEASE
        assoc.join(LONG)
        assert assoc.is_released and not assoc.is_alive()
    finally:
        server.shutdown()


class _NoMoreReads:
    """A socket that must not be read: what is asked for was read ahead already."""

    def recv_into(self, *args):  # type: ignore[no-untyped-def]
        raise AssertionError("read the socket")


def test_the_next_pdus_header_comes_with_the_body_before_it_and_is_served_without_a_read(pair):
    a, b = pair
    body, header = bytes(range(256)) * 64, b"\x04\x00\x00\x00\x00\x10"
    b.sendall(body + header + b"rest of the next PDU")
    transport = SimpleNamespace(socket=a, _is_connected=True)
    assert dul_io.recv(transport, len(body)) == body
    assert dul_io.ahead(transport) == dul_io.READ_AHEAD == 6
    assert dul_io.ready(transport)
    transport.socket = _NoMoreReads()
    assert dul_io.recv(transport, 2) == header[:2]  # served in pieces too
    assert dul_io.recv(transport, 4) == header[2:]
    assert dul_io.ahead(transport) == 0
    transport.socket = a
    assert dul_io.recv(transport, 20) == b"rest of the next PDU"


def test_a_header_read_ahead_in_part_is_completed_from_the_socket(pair):
    a, b = pair
    transport = SimpleNamespace(socket=a, _is_connected=True)
    b.sendall(b"body" + b"\x04\x00")
    got = dul_io.recv(transport, 4)
    assert got == b"body" and dul_io.ahead(transport) in (0, 2)
    b.sendall(b"\x00\x00\x00\x02")
    assert dul_io.recv(transport, 6) == b"\x04\x00\x00\x00\x00\x02"


def test_the_reactors_idle_wait_returns_at_once_while_bytes_read_ahead_wait(pair):
    a, b = pair
    b.sendall(b"xy")
    dul = _dul(a)
    dul.socket.recv = lambda n: dul_io.recv(dul.socket, n)
    assert dul.socket.recv(1) == b"x" and dul_io.ahead(dul.socket) == 1
    t0 = time.monotonic()
    dul_io._dul_idle(dul, 1.0)  # select() would see nothing: the byte is held in the process
    assert time.monotonic() - t0 < 0.5
