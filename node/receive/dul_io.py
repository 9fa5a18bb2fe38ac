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

Each DUL thread also gets an eventfd (`_Wakeup`) that the other threads write to when they give it work
(a primitive to send, an event, the kill flag), and each association thread is told when its DUL queues an
A-RELEASE or A-ABORT for it. With every source of work able to wake them, both loops wait up to 20 ms
instead of 1 ms: with 4 associations, 8 threads woke 8,000 times a second to find nothing, each time taking
the GIL from the threads that were writing instances. Timers (ARTIM, network timeout) are checked up to
20 ms later than before; nothing else waits longer. Without os.eventfd (not Linux), the waits stay 1 ms.

Only the sleeps inside the two reactor loops change (they are told apart by the calling code object);
pynetdicom's other sleeps keep their lengths. Relies on pynetdicom 3's internals (pinned < 4).
"""

from __future__ import annotations

import os
import select
import ssl
import sys
import threading
import time
from typing import Any, Callable

from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom.transport import AssociationSocket

_DUL_LOOP = _dul.DULServiceProvider.run_reactor.__code__
_ASSOCIATION_LOOP = _association.Association._run_reactor.__code__
_make_target = _dul.make_target
# How long an idle reactor loop waits when everything that gives it work also wakes it.
IDLE_WAIT = 0.02
# What `recv` allocates ahead of the bytes that have arrived.
PREALLOCATE = 4 * 2**20
# What `recv` asks for beyond the bytes wanted: a PDU header (recv says why).
READ_AHEAD = 6


def os_socket(assoc: Any) -> Any:
    """The socket under an association (pynetdicom 3 keeps it at assoc.dul.socket.socket); None once
    pynetdicom has dropped it, or before it has one."""
    return getattr(getattr(assoc.dul, "socket", None), "socket", None)


class _Wakeup:
    """An eventfd the other threads write to when they give a DUL thread work; closed when that thread ends.

    Writes after the close are dropped under the lock, so a late poke never reaches a reused descriptor."""

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._fd

    def poke(self) -> None:
        with self._lock:
            if self._fd >= 0:
                try:
                    os.eventfd_write(self._fd, 1)
                except BlockingIOError:  # counter full: already readable
                    pass

    def drain(self) -> None:
        """Called only by the DUL thread itself, which is also the one that closes."""
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _wake_association(dul: _dul.DULServiceProvider) -> None:
    messages = dul.assoc.dimse.msg_queue
    with messages.not_empty:
        messages.not_empty.notify_all()


def _attach(dul: _dul.DULServiceProvider, wakeup: _Wakeup) -> None:
    """Make every hand-over of work to `dul` from another thread poke `wakeup`, and wake the association
    loop whenever the DUL queues a primitive for it or another thread asks it to pause."""

    def then_poke(fn: Callable[..., None]) -> Callable[..., None]:
        def call(*args: Any, **kwargs: Any) -> None:
            fn(*args, **kwargs)
            if threading.current_thread() is not dul:
                wakeup.poke()

        return call

    def then_tell(fn: Callable[..., None]) -> Callable[..., None]:
        def call(*args: Any, **kwargs: Any) -> None:
            fn(*args, **kwargs)
            _wake_association(dul)

        return call

    dul.event_queue.put = then_poke(dul.event_queue.put)  # type: ignore[method-assign]
    dul.to_provider_queue.put = then_poke(dul.to_provider_queue.put)  # type: ignore[method-assign]
    dul.kill_dul = then_poke(dul.kill_dul)  # type: ignore[method-assign]
    dul.to_user_queue.put = then_tell(dul.to_user_queue.put)  # type: ignore[method-assign]
    # A thread that sends on the association (send_c_store, release, ...) clears the checkpoint and spins
    # until the association loop reaches it: wake the loop so it gets there at once.
    checkpoint = dul.assoc._reactor_checkpoint
    checkpoint.clear = then_tell(checkpoint.clear)  # type: ignore[method-assign]
    dul._ainode_wakeup = wakeup  # type: ignore[attr-defined]


def close_pause_window(assoc: Any) -> None:
    """Make pynetdicom's reactor pause safe: a sender must never see a loop that is running on as paused.

    A sending thread clears `_reactor_checkpoint`, waits until `_is_paused` is True, sends its request and
    takes the reply off the DIMSE queue. The loop sets `_is_paused = True`, then waits on the checkpoint,
    then sets it False and looks at the queue. A clear between the loop's wait returning (still set) and
    its `_is_paused = False` showed the sender a loop that was about to look at the queue: under load the
    loop could take the reply (pynetdicom logs "Received unexpected C-ECHO service message") and the
    sender waited out its DIMSE timeout (pydicom/pynetdicom#875; twice in CI runs here). Now the clear
    and the loop's look at the checkpoint take one lock, and a loop that finds it set marks itself not
    paused before it lets go of the lock, so a sender clearing after that waits for the loop's next pass.
    The same holds for a loop woken from its pause: it passes only through that locked look.
    """
    checkpoint: threading.Event = assoc._reactor_checkpoint
    lock = threading.Lock()
    clear, wait = checkpoint.clear, checkpoint.wait

    def locked_clear() -> None:
        with lock:
            clear()
            if threading.current_thread() is assoc:
                # The loop pausing itself to send: pynetdicom's network-timeout A-RELEASE (`_is_paused = True`,
                # wait, release(), which clears and waits for `_is_paused`). Its wait here just set the flag
                # False; the loop is the caller, so it is not looking at the queue, and must not wait on itself.
                assoc._is_paused = True

    def pause_or_pass(timeout: float | None = None) -> bool:
        while True:
            with lock:
                if checkpoint.is_set():
                    assoc._is_paused = False
                    return True
            # Paused: `_is_paused` stays True, as the loop set it, and the sender may go on. Woken by its
            # set, the loop looks again under the lock: the next sender may have cleared in between, and
            # still sees a paused loop, so the loop must stay paused too.
            if not wait(timeout):
                return False

    checkpoint.clear = locked_clear  # type: ignore[method-assign]
    checkpoint.wait = pause_or_pass  # type: ignore[method-assign]


def make_target(target_fn: Callable[[], None]) -> Callable[[], None]:
    """pynetdicom.dul.make_target: a DUL thread closes its association's pause window (close_pause_window:
    with or without a wakeup) and runs with its `_Wakeup` attached, which it closes on exit."""
    inner = _make_target(target_fn)
    dul = getattr(target_fn, "__self__", None)
    if not isinstance(dul, _dul.DULServiceProvider):
        return inner

    def run() -> None:
        close_pause_window(dul.assoc)
        try:
            wakeup = _Wakeup() if hasattr(os, "eventfd") else None
        except OSError:  # out of descriptors: this DUL keeps the 1 ms waits
            wakeup = None
        if wakeup is None:
            inner()
            return
        _attach(dul, wakeup)
        try:
            inner()
        finally:
            dul._ainode_wakeup = None  # type: ignore[attr-defined]
            wakeup.close()
            _wake_association(dul)  # it checks whether its DUL still runs

    return run


def recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv: `nr_bytes` bytes, or fewer if the peer closed the connection first.

    The buffer holds at most PREALLOCATE bytes more than have arrived: a PDU's length is the peer's word,
    and 6 bytes announcing 4 GB (before any AE title or address is checked) must not make the node
    allocate 4 GB. A larger PDU's buffer doubles as its bytes come in.

    Each read also asks for up to READ_AHEAD bytes beyond `nr_bytes`: reading a PDU's body, the next PDU's
    header comes with its last bytes when the sender has sent it, and the next call (`ahead`, p_data's
    `_waiting_header`) takes it without a system call of its own (a DCMTK sender's CT slice comes in 6
    PDUs: 12 reads became about 7). A blocking read returns as soon as any bytes are there, so asking for
    more never waits longer. Bytes read ahead are kept on the socket object, served first, and make
    `ready` true."""
    sock = self.socket
    buf = bytearray(min(nr_bytes, PREALLOCATE) + READ_AHEAD)
    got = 0
    kept = getattr(self, "_ainode_ahead", None)
    if kept:
        got = min(len(kept), nr_bytes)
        buf[:got] = kept[:got]
        del kept[:got]
    end = nr_bytes + READ_AHEAD
    while got < nr_bytes:
        if got == len(buf):
            buf.extend(bytes(min(len(buf), end - got)))
        with memoryview(buf) as view, view[got:end] as rest:  # released before the next extend
            n = sock.recv_into(rest, len(rest))  # type: ignore[union-attr]
        if not n:
            break
        got += n
    if got > nr_bytes:
        self._ainode_ahead = (kept or bytearray()) + buf[nr_bytes:got]  # type: ignore[attr-defined]
        got = nr_bytes
    del buf[got:]
    return buf


def ahead(transport: Any) -> int:
    """Bytes `recv` has read ahead on this AssociationSocket (served to the next recv call)."""
    kept = getattr(transport, "_ainode_ahead", None)
    return len(kept) if kept else 0


_pynetdicom_ready = AssociationSocket.ready


def ready(self: AssociationSocket) -> bool:
    """AssociationSocket.ready: also true while bytes read ahead wait (select would not see them)."""
    if ahead(self) and self.socket is not None and self._is_connected:
        return True
    return _pynetdicom_ready.fget(self)  # type: ignore[attr-defined]


def _dul_idle(dul: _dul.DULServiceProvider, seconds: float) -> None:
    """Until the socket has data (the loop reads it next), a primitive waits to be sent, or `seconds` pass."""
    transport = dul.socket
    sock = getattr(transport, "socket", None)
    if sock is None or not getattr(transport, "_is_connected", False) or not dul.to_provider_queue.empty():
        time.sleep(seconds)
        return
    if isinstance(sock, ssl.SSLSocket) and sock.pending():  # decrypted bytes select() cannot see
        return
    if ahead(transport):  # bytes read ahead (recv), which select() cannot see either
        return
    wakeup: _Wakeup | None = getattr(dul, "_ainode_wakeup", None)
    try:
        if wakeup is None:
            select.select([sock], [], [], seconds)
            return
        wakeup.drain()  # then look: work handed over after this point also leaves the eventfd readable
        if dul._kill_thread or not dul.event_queue.empty() or not dul.to_provider_queue.empty():
            return
        select.select([sock, wakeup], [], [], max(seconds, IDLE_WAIT))
    except (OSError, ValueError):  # closed meanwhile: the loop finds out on its next look
        time.sleep(seconds)


def _association_idle(assoc: _association.Association, seconds: float) -> None:
    """Until a decoded DIMSE message is queued for the association, or `seconds` pass.

    While its DUL runs with a `_Wakeup`, this wait is also woken when the DUL queues a primitive for the
    association or ends, and when another thread asks the loop to pause, so it may be IDLE_WAIT long; a
    primitive already queued keeps it at `seconds` (the loop may not consume it)."""
    messages = assoc.dimse.msg_queue
    dul = assoc.dul
    wait = seconds
    with messages.not_empty:
        if messages._qsize():  # type: ignore[attr-defined]
            return
        if not assoc._reactor_checkpoint.is_set():  # another thread waits for the loop to pause
            return
        if getattr(dul, "_ainode_wakeup", None) is not None and dul.to_user_queue.empty():
            wait = max(seconds, IDLE_WAIT)
        messages.not_empty.wait(wait)


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
    AssociationSocket.ready = property(ready)  # type: ignore[method-assign,assignment]
    _dul.time = _ReactorTime()  # type: ignore[assignment]
    _dul.make_target = make_target  # type: ignore[attr-defined]
    _association.time = _ReactorTime()  # type: ignore[assignment]
