"""C-STORE-RQ primitives made from the command set's bytes, not from pydicom's converted elements.

Two steps of pynetdicom's, both per received instance:

1. `decode_msg`: pynetdicom decodes each command set with pydicom's reader and then reads its Command Field
   and Data Set Type through pydicom's conversion (about 45 µs of the 86 µs it takes to take in a CT
   slice's 6 P-DATA). Here, with no listener bound to EVT_DIMSE_RECV (node/logs.py binds none), a command
   set that arrives whole in its first fragment (as DCMTK and pynetdicom send it) is read from its bytes by
   `plain_command` when it is a plain C-STORE-RQ with a data set; the message is then a `C_STORE_RQ`
   (PlainStoreRQ) whose pydicom command set is decoded only if something asks for it (`command_set`). Its
   data set fragments take pynetdicom's path unchanged. Anything else (another message, a command set in
   pieces, an element not listed below, a length its VR does not imply, pynetdicom's chunked data set mode)
   takes pynetdicom's path from the start.
   Its data set is gathered in the `CappedDataSet` the receiver makes (the AE's `ainode_new_data_set`):
   past node.max_dataset_mb it keeps nothing more and only counts, so a sender that sends more is refused
   (0xA700) without the node holding it all in memory first; past node.receive_to_disk_mb it goes on in a
   spool temp file (node/receive/spill.py).
2. `message_to_primitive`, below.

pynetdicom turns every received DIMSE message into a primitive by walking its command set (a pydicom
Dataset) and converting each element (a DataElement, its validation, the dataset updated), then setting
the primitive's attribute of the same keyword: about 60 µs for a C-STORE-RQ's 7 elements, for every
received instance. The command set of a C-STORE-RQ is fixed (PS3.7 9.3.1.1): the four values pynetdicom
keeps are two UIDs and two 16-bit integers, which are read here from the elements still as received
(Implicit VR Little Endian; the receive checks' raw_ui and raw_us) and set through the same primitive
setters, with the same checks.

Only for a C-STORE-RQ holding exactly the elements below, each of the length its VR implies (a UID of one
value); anything else, a Move Originator included, goes through pynetdicom's conversion unchanged. The
result is what pynetdicom builds (tests/test_store_request.py). Relies on pynetdicom 3's internals (pinned < 4).
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any, Callable

from pydicom.dataset import Dataset
from pynetdicom import _config, evt
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

from node.receive.checks import CONVERT, raw_ui, raw_us
from node.receive.spill import SpillFile

GROUP_LENGTH, SOP_CLASS, COMMAND_FIELD, MESSAGE_ID = 0x00000000, 0x00000002, 0x00000100, 0x00000110
PRIORITY, DATA_SET_TYPE, SOP_INSTANCE = 0x00000700, 0x00000800, 0x00001000
_ELEMENTS = frozenset({GROUP_LENGTH, SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, PRIORITY, DATA_SET_TYPE, SOP_INSTANCE})

_pynetdicom_message_to_primitive = DIMSEMessage.message_to_primitive
_pynetdicom_decode_msg = DIMSEMessage.decode_msg
_ELEMENT = struct.Struct("<HHL")  # Implicit VR Little Endian: group, element, value length
_US = frozenset({COMMAND_FIELD, MESSAGE_ID, PRIORITY, DATA_SET_TYPE})
C_STORE_RQ_FIELD, NO_DATA_SET = 0x0001, 0x0101


def plain_command(raw: bytes) -> tuple[Any, Any, Any, Any] | None:
    """(Message ID, SOP class, SOP instance, Priority) of a command set's bytes, each None if absent, when it
    is a plain C-STORE-RQ with a data set: only the elements above, each once, in group 0000, within the
    bytes; a US of 2 bytes, the group length of 4; a UID of one value. None: pynetdicom decides."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = _ELEMENT.unpack_from(raw, pos)
        pos += 8
        if group or element not in _ELEMENTS or element in values or length > end - pos:
            return None
        values[element] = raw[pos:pos + length]
        pos += length
    for tag, value in values.items():
        if tag in _US and len(value) != 2 or tag == GROUP_LENGTH and len(value) != 4:
            return None
    command, data_set = values.get(COMMAND_FIELD), values.get(DATA_SET_TYPE)
    if (command is None or int.from_bytes(command, "little") != C_STORE_RQ_FIELD or data_set is None
            or int.from_bytes(data_set, "little") == NO_DATA_SET):
        return None
    uids = [values.get(t) for t in (SOP_CLASS, SOP_INSTANCE)]
    texts = [None if u is None else u.decode("latin-1").rstrip(" \x00") for u in uids]
    if any(t is not None and "\\" in t for t in texts):  # several values: pynetdicom warns, takes the first
        return None
    message_id, priority = values.get(MESSAGE_ID), values.get(PRIORITY)
    return (None if message_id is None else int.from_bytes(message_id, "little"), texts[0], texts[1],
            None if priority is None else int.from_bytes(priority, "little"))


class CappedDataSet(BytesIO):
    """A received data set that keeps at most `limit` bytes: past it, it drops what it held and only counts
    (`over`, `received`). The receiver then refuses the instance as too large.

    Given `spill_at` and `open_spill`, past `spill_at` bytes it goes on in the file `open_spill()` gives
    (node/receive/spill.py) instead of memory: what it held is written there first. Should opening or
    writing that file fail (a full disk), `failed` keeps the error and it only counts from then on."""

    def __init__(self, limit: int, spill_at: int | None = None,
                 open_spill: Callable[[], SpillFile] | None = None) -> None:
        super().__init__()
        self.limit, self.received, self.over = limit, 0, False
        self.spill_at, self._open_spill = spill_at, open_spill
        self.spill: SpillFile | None = None
        self.failed: Exception | None = None

    def write(self, data: Any) -> int:  # type: ignore[override]
        n = len(data)
        self.received += n
        if self.over or self.failed is not None:
            return n
        if self.received > self.limit:
            self.over = True
            self._drop()
            return n
        if self.spill is None and self.spill_at is not None and self.received > self.spill_at:
            try:
                self.spill = self._open_spill()  # type: ignore[misc]
                self.spill.write(self.getbuffer())
            except Exception as exc:  # noqa: BLE001 - on the DUL thread: kept for the receiver to refuse
                self.failed = exc.with_traceback(None)  # its frames would keep the file's objects alive
                self._drop()
                return n
            self.seek(0)
            self.truncate()
        if self.spill is not None:
            try:
                self.spill.write(data)
            except OSError as exc:
                self.failed = exc.with_traceback(None)
                self._drop()
            return n
        return super().write(data)

    def _drop(self) -> None:
        self.seek(0)
        self.truncate()
        if self.spill is not None:
            self.spill.close()
            self.spill = None


class PlainStoreRQ(C_STORE_RQ):
    """A C-STORE-RQ whose command set was read by `plain_command`; pydicom decodes it only when asked."""

    plain: tuple[Any, Any, Any, Any]
    command_bytes: bytes

    @property  # type: ignore[override]
    def command_set(self) -> Dataset:
        cs = self.__dict__.get("_command_set")
        if cs is None:
            cs = self.__dict__["_command_set"] = decode(BytesIO(self.command_bytes), True, True)
        return cs

    @command_set.setter
    def command_set(self, value: Dataset) -> None:
        self.__dict__["_command_set"] = value


PlainStoreRQ.__name__ = PlainStoreRQ.__qualname__ = "C_STORE_RQ"  # pynetdicom's message_to_primitive goes by name


def decode_msg(self: DIMSEMessage, primitive: Any, assoc: Any = None) -> bool:
    """DIMSEMessage.decode_msg, with a plain C-STORE-RQ's command set read from its bytes (step 1 above)."""
    if type(self) is not DIMSEMessage or primitive.__class__ is not P_DATA:  # data set fragments, and the rest
        return _pynetdicom_decode_msg(self, primitive, assoc)
    pdvs = primitive.presentation_data_value_list
    if (not pdvs or pdvs[0][1][0] & 3 != 3 or self.encoded_command_set.tell() or _config.STORE_RECV_CHUNKED_DATASET
            or assoc is None or assoc.get_handlers(evt.EVT_DIMSE_RECV)):  # a listener gets pynetdicom's message
        return _pynetdicom_decode_msg(self, primitive, assoc)
    context_id, fragment = pdvs[0]
    raw = bytes(fragment[1:])
    plain = plain_command(raw)
    if plain is None:
        return _pynetdicom_decode_msg(self, primitive, assoc)
    self.__class__ = PlainStoreRQ
    self.command_bytes, self.plain, self.context_id = raw, plain, context_id  # type: ignore[attr-defined]
    new_data_set = getattr(getattr(assoc, "ae", None), "ainode_new_data_set", None)  # set by the receiver
    if new_data_set is not None:
        context = assoc._accepted_cx.get(context_id)  # None: not accepted, the association thread aborts
        self.data_set = new_data_set(plain[1], plain[2], context.transfer_syntax[0] if context else None)
    if len(pdvs) == 1:
        return False
    rest = P_DATA()
    rest.presentation_data_value_list.extend(pdvs[1:])  # as p_data fills it: the setter checks each item again
    return _pynetdicom_decode_msg(self, rest, assoc)


def _plain(command_set: Any) -> tuple[Any, Any, Any, Any] | None:
    """(Message ID, SOP class, SOP instance, Priority) of a plain C-STORE-RQ's command set, each None if
    absent; None where pynetdicom's conversion must decide (an unexpected element; checks.raw_ui and raw_us
    say which values)."""
    if not set(command_set.keys()) <= _ELEMENTS:
        return None
    values = (raw_us(command_set, MESSAGE_ID), raw_ui(command_set, SOP_CLASS), raw_ui(command_set, SOP_INSTANCE),
              raw_us(command_set, PRIORITY))
    # A UID of several values: pynetdicom warns and takes the first.
    if any(v is CONVERT or isinstance(v, str) and "\\" in v for v in values):
        return None
    return values


def message_to_primitive(self: DIMSEMessage) -> Any:
    """DIMSEMessage.message_to_primitive, with a plain C-STORE-RQ read straight from its command set."""
    if type(self) is PlainStoreRQ:
        values: tuple[Any, Any, Any, Any] | None = self.plain
    else:
        values = _plain(self.command_set) if type(self) is C_STORE_RQ else None
    if values is None:
        return _pynetdicom_message_to_primitive(self)
    message_id, sop_class, sop_instance, priority = values
    primitive = C_STORE()
    if message_id is not None:
        primitive.MessageID = message_id
    if sop_class is not None:
        primitive.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        primitive.AffectedSOPInstanceUID = sop_instance
    if priority is not None:
        primitive.Priority = priority
    primitive.DataSet = self.data_set
    primitive._context_id = self.context_id
    primitive._dataset_path = self._data_set_path
    primitive._dataset_file = self._data_set_file
    return primitive


def install() -> None:
    DIMSEMessage.message_to_primitive = message_to_primitive  # type: ignore[method-assign]
    DIMSEMessage.decode_msg = decode_msg  # type: ignore[method-assign]
