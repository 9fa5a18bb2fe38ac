"""C-STORE-RSP Success, encoded straight to bytes.

pynetdicom builds every response as a pydicom Dataset and encodes it with pydicom's writer: about 0.5 ms an
instance, some 8% of the receiver's CPU with one association. A Success response is seven fixed elements in
Implicit VR Little Endian (PS3.7 9.3.1.2), so it is written here directly; every other response (a failure
or warning, one with an error comment or offending element) still goes through pynetdicom, as do all other
DIMSE messages. The bytes are the ones pynetdicom writes (tests/test_store_response.py).

The association thread also sends that PDU itself, where pynetdicom would queue it for the DUL thread,
which looks at its queue once a millisecond: the sender waited for that poll on every instance.
"""

from __future__ import annotations

import ssl
import struct

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
LAST_COMMAND_FRAGMENT = b"\x03"  # PS3.8 E.2: command, last fragment


def _ui(element: int, uid: str) -> bytes:
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _us(element: int, value: int) -> bytes:
    return struct.pack("<HHIH", 0x0000, element, 2, value)


def success_command_set(sop_class_uid: str, message_id: int, sop_instance_uid: str) -> bytes:
    """The encoded command set of a C-STORE-RSP with Status 0x0000."""
    body = (_ui(0x0002, sop_class_uid) + _us(0x0100, C_STORE_RSP) + _us(0x0120, message_id)
            + _us(0x0800, NO_DATA_SET) + _us(0x0900, 0x0000) + _ui(0x1000, sop_instance_uid))
    return struct.pack("<HHII", 0x0000, 0x0000, 4, len(body)) + body


def _plain_success(primitive: object) -> bool:
    return (type(primitive) is C_STORE and primitive.MessageIDBeingRespondedTo is not None  # type: ignore[attr-defined]
            and primitive.Status == 0x0000 and primitive.ErrorComment is None  # type: ignore[attr-defined]
            and primitive.OffendingElement is None  # type: ignore[attr-defined]
            and bool(primitive.AffectedSOPClassUID) and bool(primitive.AffectedSOPInstanceUID))  # type: ignore[attr-defined]


def p_data_tf(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF PDU holding one PDV: the last fragment of a command (PS3.8 9.3.5)."""
    pdv_length = 2 + len(command)  # context ID, message control header, fragment
    return (struct.pack(">BBIIB", 0x04, 0x00, 4 + pdv_length, pdv_length, context_id)
            + LAST_COMMAND_FRAGMENT + command)


def _send_now(dul, context_id: int, command: bytes) -> bool:  # type: ignore[no-untyped-def]
    """Send the PDU from the association thread, as the DUL thread would (state machine action DT-1 in
    Sta6), rather than queue it for the DUL thread's next 1 ms poll. Only when nothing is queued ahead of
    it and nothing listens for sent PDUs; False: queue it as pynetdicom does."""
    transport = dul.socket
    if (transport is None or isinstance(transport.socket, ssl.SSLSocket)  # one thread per TLS connection
            or dul.state_machine.current_state != "Sta6" or not dul.to_provider_queue.empty()
            or dul.assoc.get_handlers(evt.EVT_PDU_SENT)):
        return False
    transport.send(p_data_tf(context_id, command))  # a failure queues Evt17 for the DUL, as there
    return True


_pynetdicom_send_msg = DIMSEServiceProvider.send_msg


def send_msg(self: DIMSEServiceProvider, primitive, context_id: int) -> None:  # type: ignore[no-untyped-def]
    """DIMSEServiceProvider.send_msg, with C-STORE-RSP Success written directly (when nothing listens for the
    message object pynetdicom would have built)."""
    if _plain_success(primitive) and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        command = success_command_set(str(primitive.AffectedSOPClassUID), int(primitive.MessageIDBeingRespondedTo),
                                      str(primitive.AffectedSOPInstanceUID))
        if not self.maximum_pdu_size or len(command) + 6 <= self.maximum_pdu_size:  # one fragment
            if not _send_now(self.dul, context_id, command):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, LAST_COMMAND_FRAGMENT + command))
                self.dul.send_pdu(pdata)
            return
    _pynetdicom_send_msg(self, primitive, context_id)


def install() -> None:
    DIMSEServiceProvider.send_msg = send_msg  # type: ignore[method-assign]
