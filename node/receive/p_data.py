"""Received P-DATA-TF PDUs handed straight to DIMSE, without pynetdicom's per-PDU objects and copies.

DCMTK's storescu sends a 512x512 CT slice as 6 PDUs (a command, then the data set in 128 KB pieces).
For each one pynetdicom's DUL thread joins the header and the body into a new buffer, copies it to bytes,
builds a PDU object and a PDV item object per fragment (slicing, so copying, each value), queues an event
and the PDU, takes them off again, and runs the state machine, whose action for a P-DATA-TF in Sta6 (DT-2,
PS3.8 9.2) is only to pass the P-DATA primitive to DIMSE. That was about a quarter of the DUL thread's
Python time and 4 of the 6 copies of each data set (py-spy, bench/receive_rate.py --profile).

Here, in Sta6 with nothing queued ahead and nothing listening for PDU-level events, the DUL thread reads
the PDU, splits it into PDVs (memoryviews of the one buffer it was read into) and calls DIMSE as DT-2
does. (pynetdicom's own debug-logging handlers listen for PDUs; node/logs.py does not bind them.) Every
other PDU, state or listener takes pynetdicom's path unchanged, with the same events for a
closed connection (Evt17) or an unknown or malformed PDU (Evt19). The PDUs after it are read in the same
pass while their headers are already in the socket (`_waiting_header` says why). Relies on pynetdicom 3's
internals (pinned < 4).
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct

from pynetdicom import dul as _dul
from pynetdicom import evt
from pynetdicom.pdu_primitives import P_DATA

from node.receive import dul_io, dul_store

# pynetdicom's own logger and messages for the same failures; a lost connection's are dropped by
# node/logs.py DropLostConnectionErrors, and the node warns naming the sender instead.
LOGGER = logging.getLogger("pynetdicom.dul")
P_DATA_TF = 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))
_HEADER = struct.Struct(">BBL")
_ITEM = struct.Struct(">LB")  # PDV item: length, then presentation context ID (PS3.8 9.3.5.1)
# Listeners that would see a PDU, its bytes or the state machine's step: with any bound, pynetdicom's path.
_PDU_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_FSM_TRANSITION)

_pynetdicom_read_pdu_data = _dul.DULServiceProvider._read_pdu_data


class MalformedPDU(ValueError):
    pass


def pdv_list(body: memoryview) -> list[tuple[int, memoryview]]:
    """(presentation context ID, message control header + fragment) of each PDV item in a P-DATA-TF body
    (the PDU after its 6-byte header). Raises MalformedPDU for an item that runs past the body or has no
    message control header."""
    out = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 6:
            raise MalformedPDU(f"PDV item header cut short at byte {pos}")
        length, context_id = _ITEM.unpack_from(body, pos)
        if length < 2 or length > end - pos - 4:
            raise MalformedPDU(f"PDV item at byte {pos} has length {length}, {end - pos - 4} bytes left")
        out.append((context_id, body[pos + 5:pos + 4 + length]))
        pos += 4 + length
    return out


def _fast(dul: _dul.DULServiceProvider) -> bool:
    assoc = dul.assoc
    return (dul.state_machine.current_state == "Sta6" and dul.event_queue.empty()
            and not any(assoc.get_handlers(e) for e in _PDU_EVENTS))


def read_pdu_data(self: _dul.DULServiceProvider) -> None:
    """DULServiceProvider._read_pdu_data, with P-DATA-TF in Sta6 handed to DIMSE directly (DT-2), and the
    PDUs after it read in the same call while their headers are already there (_waiting_header)."""
    if not _fast(self):
        _pynetdicom_read_pdu_data(self)
        return
    try:
        head = self.socket.recv(6)  # type: ignore[union-attr]
    except (OSError, TimeoutError) as exc:
        LOGGER.error("Connection closed before the entire PDU was received")
        LOGGER.exception(exc)
        self.event_queue.put("Evt17")
        return
    while head is not None and _read_one(self, head):
        head = _waiting_header(self)


def _waiting_header(dul: _dul.DULServiceProvider) -> bytearray | None:
    """The next PDU's header if its first bytes are already in the socket and the reactor loop has nothing
    else to do; None: back to the loop.

    A sender's next PDU usually follows at once (a data set comes in 128 KB PDUs). Reading it here saves the
    loop's pass: its readiness select, its idle select, each a system call that lets go of the GIL, which
    another association's thread then takes (two context switches each, with 4 associations on 2 cores).
    Only on a blocking socket (MSG_DONTWAIT then returns at once; with a timeout Python would poll first),
    not under TLS, and not when the loop has a primitive to send, an event or the kill flag waiting."""
    transport = dul.socket
    sock = getattr(transport, "socket", None)
    if (sock is None or isinstance(sock, ssl.SSLSocket) or sock.gettimeout() is not None
            or dul._kill_thread or not dul.to_provider_queue.empty() or not _fast(dul)):
        return None
    if dul_io.ahead(transport):  # read with the last PDU's body (dul_io.recv): no system call, or the rest
        return transport.recv(6)  # type: ignore[union-attr] # of a header the sender has begun to send
    head = bytearray(6)
    try:
        got = sock.recv_into(head, 6, socket.MSG_DONTWAIT)
    except OSError:  # nothing there yet (BlockingIOError), or an error the loop's next read reports
        return None
    if got == 0:  # closed: the loop's next read finds it
        return None
    if got < 6:  # a header cut by the network: the rest is on its way (short if closed: _read_one says Evt17)
        try:
            rest = transport.recv(6 - got)  # type: ignore[union-attr]
        except (OSError, TimeoutError):
            rest = bytearray()
        return head[:got] + rest
    return head


def _read_one(self: _dul.DULServiceProvider, head: bytearray) -> bool:
    """Read and act on the PDU whose header is `head`; True if it was a P-DATA-TF handed to DIMSE."""
    sock = self.socket
    if len(head) < 6:  # the peer closed the connection
        self.event_queue.put("Evt17")
        return False
    pdu_type, _, length = _HEADER.unpack(head)
    if pdu_type not in _PDU_TYPES:
        LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
        self.event_queue.put("Evt19")
        return False
    try:
        body = sock.recv(length)  # type: ignore[union-attr]
    except (OSError, TimeoutError) as exc:
        LOGGER.error("Connection closed before the entire PDU was received")
        LOGGER.exception(exc)
        self.event_queue.put("Evt17")
        return False
    if len(body) != length:
        LOGGER.error(f"The received PDU is shorter than expected ({6 + len(body)} of {6 + length} bytes "
                     "received)")
        self.event_queue.put("Evt17")
        return False
    if pdu_type != P_DATA_TF:  # an A-RELEASE-RQ, A-ABORT, ...: decoded and queued as pynetdicom does
        try:
            pdu, event = self._decode_pdu(head + body)
            self.event_queue.put(event)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: any decode failure is Evt19
            LOGGER.error("Unable to decode the received PDU data")
            LOGGER.exception(exc)
            self.event_queue.put("Evt19")
            return False
        self._recv_pdu.put(pdu)
        return False
    try:
        pdvs = pdv_list(memoryview(body))
    except MalformedPDU as exc:
        LOGGER.error(f"Unable to decode the received PDU data: {exc}")
        self.event_queue.put("Evt19")
        return False
    primitive = P_DATA()
    primitive.presentation_data_value_list.extend(pdvs)  # type: ignore[arg-type] # as P_DATA_TF.to_primitive fills it
    dul_store.receive(self.assoc.dimse, primitive)  # DT-2; the state stays Sta6
    return True


def install() -> None:
    _dul.DULServiceProvider._read_pdu_data = read_pdu_data  # type: ignore[method-assign]
