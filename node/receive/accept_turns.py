"""Which receive process takes the next association (node.receive_processes > 1).

The processes used to bind node.port each with SO_REUSEPORT, and the kernel hashed every new connection
to one of them. For 4 connections to 2 processes that hash split them 2:2 in 81 of 200 trials, 3:1 in
99 and 4:0 in 20 (a loop of 4 connects to 2 SO_REUSEPORT sockets on 127.0.0.1). A process's Python runs
on one core, so with an uneven split one core did most of the work for the whole push; and one association
went to a receive process half the time, which costs a round trip to the node process per instance.

Now every process accepts on one listening socket, made by the node process and passed to the others, and
the process with the fewest open connections takes the next one (the lowest index on a tie, so one
association goes to the node process, which needs no round trip to index it). The others wait up to
DEFER_S for it to do so and then take the connection themselves, so a process that is slow to accept
holds no sender up for longer than that.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from typing import Any

from pynetdicom.transport import RequestHandler

from node.receive.dul_io import os_socket

DEFER_S = 0.25  # how long a process whose turn it is not leaves a pending connection to the others
POLL_S = 0.002
RETIRED = 2**30  # the count of a process that has exited


class AcceptTurns:
    """One process's view of the shared counts of open connections, one slot per receive process.

    Slot 0 is the node process. Each process writes only its own slot, whenever its count changes.
    """

    def __init__(self, counts: Any, index: int = 0, listener: socket.socket | None = None) -> None:
        self.counts = counts  # multiprocessing Array("i", lock=False)
        self.index = index
        self.listener = listener  # None in the node process, which binds node.port itself

    @classmethod
    def create(cls, processes: int) -> "AcceptTurns":
        """The node process's turns; call for_process to make the others'."""
        return cls(mp.get_context("spawn").Array("i", processes, lock=False))  # no lock: processes.py says why

    def for_process(self, index: int, listener: socket.socket) -> "AcceptTurns":
        """A receive process's turns: pass it to that process when it is spawned (the socket travels then)."""
        return AcceptTurns(self.counts, index, listener)

    @property
    def processes(self) -> int:
        return len(self.counts)

    def publish(self, open_connections: int) -> None:
        self.counts[self.index] = open_connections

    def retire(self, index: int) -> None:
        """That process has exited: it has no turn until reinstated."""
        self.counts[index] = RETIRED

    def reinstate(self, index: int) -> None:
        """A process started in a retired one's place listens now: it takes turns from no open connections."""
        self.counts[index] = 0

    def my_turn(self) -> bool:
        counts = self.counts[:]
        mine = (counts[self.index], self.index)
        return all(mine <= (c, i) for i, c in enumerate(counts) if i != self.index)

    def wait_for_turn(self) -> None:
        deadline = time.monotonic() + DEFER_S
        while not self.my_turn() and time.monotonic() < deadline:
            time.sleep(POLL_S)


class _HeldRequestHandler(RequestHandler):
    """pynetdicom's handler, whose thread stays until the connection's association has ended, so that the
    server can count its open connections exactly, and at once when one closes."""

    def _create_association(self) -> Any:
        self.assoc = super()._create_association()
        return self.assoc

    def handle(self) -> None:
        super().handle()
        # A connection closed before it asked for an association (a port check) keeps its association
        # thread for the ACSE timeout (10 s), waiting for a request: it is counted only while it is open.
        while self.assoc.is_alive() and _connected(self.assoc):
            self.assoc.join(0.5)


def _connected(assoc: Any) -> bool:
    """Its socket is open (pynetdicom closes a dropped connection's socket but may keep the object)."""
    sock = os_socket(assoc)
    return sock is not None and sock.fileno() != -1


class TurnTakingServer:
    """Mixin for a pynetdicom server class (first in the bases): accepts on the shared listening socket,
    and only in this process's turn. `turns` is set on the subclass that turn_taking() builds.

    A process's open connections are counted from its accept to the end of the connection's association
    (_HeldRequestHandler), and published on each change. pynetdicom's EVT_CONN_CLOSE could not count them
    down: an association that ends with a release is stopped before its DUL sees the peer close, and raises
    none. Nor could the running association threads, published when another connection is pending: the
    other processes' loops do not all wake for it (one accepts first), so their counts went stale.
    """

    turns: AcceptTurns
    request_queue_size = 64  # connections wait here while the processes take turns; socketserver's is 5
    daemon_threads = True  # each connection's thread now lives as long as its association: never wait for it
    _open = 0
    _open_lock: threading.Lock  # one per server class: turn_taking() sets it

    def server_bind(self) -> None:
        if self.turns.listener is None:
            super().server_bind()  # type: ignore[misc]
            return
        self.socket.close()  # type: ignore[has-type]
        self.socket = self.turns.listener
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.turns.listener is None:
            super().server_activate()  # type: ignore[misc]
        # Non-blocking: when another process took the connection first, accept() raises BlockingIOError
        # and socketserver goes back to waiting, instead of blocking until the next one. The flag is shared
        # by every process's copy of the socket, as is the listening state (hence no shutdown() below).
        self.socket.settimeout(0.0)

    def _count(self, change: int) -> None:
        with self._open_lock:
            self._open += change
            self.turns.publish(self._open)

    def get_request(self):  # type: ignore[no-untyped-def]
        self.turns.wait_for_turn()
        request = super().get_request()  # type: ignore[misc]
        self._count(+1)
        return request

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """The connection's thread: runs until its association has ended (or it is dropped)."""
        try:
            super().process_request_thread(request, client_address)  # type: ignore[misc]
        finally:
            self._count(-1)

    def finish_request(self, request: Any, client_address: Any) -> None:
        _HeldRequestHandler(request, client_address, self)

    def server_close(self) -> None:
        """Closes this process's copy only: socket.shutdown() would stop the other processes listening too."""
        self.socket.close()


def turn_taking(server_class: type, turns: AcceptTurns) -> type:
    """`server_class` accepting in turns; for AE.make_server(server_class=...)."""
    return type(f"TurnTaking{server_class.__name__}", (TurnTakingServer, server_class),
                {"turns": turns, "_open_lock": threading.Lock()})
