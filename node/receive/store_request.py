"""C-STORE-RQ primitives made from the command set's bytes, not from pydicom's converted elements.

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

from typing import Any

from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE

from node.receive.checks import CONVERT, raw_ui, raw_us

GROUP_LENGTH, SOP_CLASS, COMMAND_FIELD, MESSAGE_ID = 0x00000000, 0x00000002, 0x00000100, 0x00000110
PRIORITY, DATA_SET_TYPE, SOP_INSTANCE = 0x00000700, 0x00000800, 0x00001000
_ELEMENTS = frozenset({GROUP_LENGTH, SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, PRIORITY, DATA_SET_TYPE, SOP_INSTANCE})

_pynetdicom_message_to_primitive = DIMSEMessage.message_to_primitive


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
