"""A C-STORE request served on the DUL thread that read it, not handed to the association thread.

pynetdicom runs each association on two threads: the DUL thread reads the PDUs and puts each complete
DIMSE message on a queue; the association thread takes it off and runs the service class, which calls the
C-STORE handler and sends the response. A sender (storescu, a PACS) waits for each C-STORE-RSP before it
sends the next instance, so the two threads never work at once on one association: every instance only
adds a hand-over, a thread woken through a futex that must then win the GIL from the threads of the
other associations. `perf` on the node with 4 associations put about a fifth of its CPU time in
context switches, most of them such futex waits.

Here the DUL thread keeps a complete C-STORE request that p_data handed to DIMSE (node/receive/p_data.py)
and runs pynetdicom's Storage SCP itself, as the association thread's `_serve_request` would. Only when
nothing is queued ahead of it for the association thread (messages keep their order), the association is
established and not releasing, no other thread has paused the association's loop to send, its context was
accepted and its SOP class is a plain storage class. Anything else is queued as before.

What the association thread still does: releases, aborts and timeouts, and every other message.
`_serve_request` aborts the association when a service class raises outside its handler; that abort
waits for the DUL thread to stop, so on the DUL thread it would never return. Here such an error aborts
without waiting (as pynetdicom's own aborts from inside a handler do), and the association thread ends the
association when its DUL stops. Relies on pynetdicom 3's internals (pinned < 4).
"""

from __future__ import annotations

import logging
import queue
from typing import Any

from pynetdicom import _config
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

LOGGER = logging.getLogger("pynetdicom.assoc")  # pynetdicom's own logger for _serve_request's messages


class MessageQueue(queue.Queue):  # type: ignore[type-arg]
    """DIMSEServiceProvider.msg_queue that can hold back the message completed by one receive_primitive call."""

    def __init__(self) -> None:
        super().__init__()
        self.holding = False  # set by the DUL thread around its own receive_primitive call
        self.held: tuple[int, Any] | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if self.holding and self.held is None:
            self.held = item
            return
        super().put(item, block, timeout)


def receive(dimse: DIMSEServiceProvider, primitive: Any) -> None:
    """DIMSEServiceProvider.receive_primitive, called on the DUL thread: a C-STORE request it completes is
    served here when `_servable`, else queued for the association thread as pynetdicom does."""
    messages = dimse.msg_queue
    if not isinstance(messages, MessageQueue):
        dimse.receive_primitive(primitive)
        return
    messages.holding = True
    try:
        dimse.receive_primitive(primitive)
    finally:
        messages.holding = False
        item, messages.held = messages.held, None
    if item is None:
        return
    context_id, message = item
    assoc = dimse.assoc
    context = _servable(assoc, context_id, message)
    if context is None:
        queue.Queue.put(messages, item)
        return
    serve(assoc, message, context)


def _servable(assoc: Any, context_id: int, message: Any) -> Any:
    """The accepted presentation context to serve `message` under on the DUL thread, or None."""
    if type(message) is not C_STORE or not message.is_valid_request:
        return None
    if (not assoc.is_acceptor or not assoc.is_established or assoc._sent_release or assoc._kill
            or not assoc._reactor_checkpoint.is_set()  # another thread is sending on the association
            or assoc.dimse.msg_queue.qsize()):  # earlier messages wait for the association thread
        return None
    context = assoc._accepted_cx.get(context_id)
    if context is None:  # the association thread aborts, as pynetdicom does
        return None
    class_uid = message.AffectedSOPClassUID
    if (_config.UNRESTRICTED_STORAGE_SERVICE or class_uid in assoc.acceptor.accepted_common_extended
            or uid_to_service_class(class_uid) is not StorageServiceClass):
        return None
    return context


def serve(assoc: Any, message: C_STORE, context: Any) -> None:
    """Association._serve_request for a C-STORE request, without its blocking aborts.

    While it runs, the association thread does not see the network idle timer expire (`idle_timer_expired`):
    the wait is this node's, not the network's, and that thread, now free, would otherwise release the
    association in the middle of a handler that takes longer than node.network_timeout_s (on its own thread
    the handler kept it from looking). The DUL restarts the timer once this returns, as after any PDU."""
    dul = assoc.dul
    assoc.dimse.cancel_req = {}
    dul._ainode_serving = True
    try:
        StorageServiceClass(assoc).SCP(message, context)
    except Exception as exc:  # noqa: BLE001 - as _serve_request: log it and abort the association
        LOGGER.exception(exc)
        assoc._abort_nonblocking()
    finally:
        dul._ainode_serving = False
    assoc.dimse.cancel_req = {}


def idle_timer_expired(self: DULServiceProvider) -> bool:
    """DULServiceProvider.idle_timer_expired: never while the DUL thread serves a C-STORE (`serve`)."""
    return not getattr(self, "_ainode_serving", False) and self._idle_timer.expired


_pynetdicom_init = DIMSEServiceProvider.__init__


def _init(self: DIMSEServiceProvider, *args: Any, **kwargs: Any) -> None:
    _pynetdicom_init(self, *args, **kwargs)
    self.msg_queue = MessageQueue()


def install() -> None:
    DIMSEServiceProvider.__init__ = _init  # type: ignore[method-assign]
    DULServiceProvider.idle_timer_expired = idle_timer_expired  # type: ignore[method-assign]
