"""pynetdicom's association I/O without its fixed 1 ms sleeps and 4 KB reads.

pynetdicom 3 runs each association on two polling threads. The DUL thread sleeps 1 ms whenever the
socket has no data yet, and the association thread sleeps 1 ms before each look at its queue of decoded
messages. A sender with one association waits for each C-STORE-RSP before it sends the next instance,
so every instance waited out those sleeps: up to 1 ms until its first bytes were read, and up to 1 ms more
until the decoded message was handled. pynetdicom also reads each PDU 4 KB per `recv()` call: 128 calls,
appends and copies for a 0.5 MB CT slice.

Here, with the same loops and the same code around them:
- `AssociationSocket.recv` reads a PDU into one buffer of its size, as many bytes as each call gives;
- the DUL thread's idle sleep is a wait, of the same length at most, for its socket to become readable;
- the association thread's sleep is a wait, of the same length at most, for a message on its queue.

Idle CPU is as before: each thread still wakes at least once a millisecond to check its timers and flags.
Only the sleeps inside the two reactor loops change (they are told apart by the calling code object);
pynetdicom's other sleeps keep their lengths. Relies on pynetdicom 3's internals (pinned < 4).
"""

from __future__ import annotations

import select
import ssl
import sys
import threading
import time
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom.transport import AssociationSocket

_DUL_LOOP = _dul.DULServiceProvider.run_reactor.__code__
_ASSOCIATION_LOOP = _association.Association._run_reactor.__code__


def recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv: `nr_bytes` bytes, or fewer if the peer closed the connection first."""
    sock = self.socket
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    try:
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)  # type: ignore[union-attr]
            if not n:
                break
            got += n
    finally:
        view.release()
    if got < nr_bytes:
        del buf[got:]
    return buf


def _dul_idle(dul: _dul.DULServiceProvider, seconds: float) -> None:
    """Until the socket has data (the loop reads it next), a primitive waits to be sent, or `seconds` pass."""
    transport = dul.socket
    sock = getattr(transport, "socket", None)
    if sock is None or not getattr(transport, "_is_connected", False) or not dul.to_provider_queue.empty():
        time.sleep(seconds)
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted bytes select() cannot see
        return
    try:
        select.select([sock], [], [], seconds)
    except (OSError, ValueError):  # closed meanwhile: the loop finds out on its next look
        time.sleep(seconds)


def _association_idle(assoc: _association.Association, seconds: float) -> None:
    """Until a decoded DIMSE message is queued for the association, or `seconds` pass."""
    messages = assoc.dimse.msg_queue
    with messages.not_empty:
        if not messages._qsize():  # type: ignore[attr-defined]
            messages.not_empty.wait(seconds)


class _ReactorTime:
    """The `time` module as pynetdicom's association and DUL modules see it: `sleep` called from one of
    the two reactor loops waits for that loop's next piece of work instead."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        caller = sys._getframe(1).f_code
        if caller is _DUL_LOOP:
            thread = threading.current_thread()
            if isinstance(thread, _dul.DULServiceProvider):
                _dul_idle(thread, seconds)
                return
        elif caller is _ASSOCIATION_LOOP:
            thread = threading.current_thread()
            if isinstance(thread, _association.Association):
                _association_idle(thread, seconds)
                return
        time.sleep(seconds)


def install() -> None:
    AssociationSocket.recv = recv  # type: ignore[method-assign]
    _dul.time = _ReactorTime()  # type: ignore[assignment]
    _association.time = _ReactorTime()  # type: ignore[assignment]
