"""C-STORE-RQ primitives made from the command set's bytes, not from pydicom's converted elements.

pynetdicom turns every received DIMSE message into a primitive by walking its command set (a pydicom
Dataset) and converting each element (a DataElement, its validation, the dataset updated), then setting
the primitive's attribute of the same keyword: about 60 µs for a C-STORE-RQ's 7 elements, for every
received instance. The command set of a C-STORE-RQ is fixed (PS3.7 9.3.1.1): the three values pynetdicom
keeps are two UIDs and two 16-bit integers, which are read here from the elements as decoded (Implicit VR
Little Endian) and set through the same primitive setters, with the same checks.

Only for a C-STORE-RQ holding exactly the elements below, each of the length its VR implies (a UID of one
value); anything else, a Move Originator included, goes through pynetdicom's conversion unchanged. The
result is what pynetdicom builds (tests/test_store_request.py). Relies on pynetdicom 3's internals (pinned < 4).
"""

from __future__ import annotations

from typing import Any

from pydicom.dataelem import RawDataElement
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE

GROUP_LENGTH, SOP_CLASS, COMMAND_FIELD, MESSAGE_ID = 0x00000000, 0x00000002, 0x00000100, 0x00000110
PRIORITY, DATA_SET_TYPE, SOP_INSTANCE = 0x00000700, 0x00000800, 0x00001000
_ELEMENTS = frozenset({GROUP_LENGTH, SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, PRIORITY, DATA_SET_TYPE, SOP_INSTANCE})

_pynetdicom_message_to_primitive = DIMSEMessage.message_to_primitive


class _Unusual(Exception):
    pass


def _value(command_set: Any, tag: int, kind: str) -> Any:
    elem = command_set.get_item(tag)
    if elem is None:
        return None
    if type(elem) is not RawDataElement:  # converted already (decode_msg reads CommandField)
        value = elem.value
        if kind == "us" and type(value) is not int or kind == "ui" and not isinstance(value, str):
            raise _Unusual
        return value
    raw = elem.value
    if raw is None:
        raise _Unusual
    if kind == "us":
        if len(raw) != 2:
            raise _Unusual
        return int.from_bytes(raw, "little")
    text = raw.decode("latin-1").rstrip(" \x00")
    if "\\" in text:  # several values: pynetdicom warns and takes the first
        raise _Unusual
    return text


def message_to_primitive(self: DIMSEMessage) -> Any:
    """DIMSEMessage.message_to_primitive, with a plain C-STORE-RQ read straight from its command set."""
    if type(self) is not C_STORE_RQ:
        return _pynetdicom_message_to_primitive(self)
    command_set = self.command_set
    try:
        if not set(command_set.keys()) <= _ELEMENTS:
            raise _Unusual
        values = [_value(command_set, MESSAGE_ID, "us"), _value(command_set, SOP_CLASS, "ui"),
                  _value(command_set, SOP_INSTANCE, "ui"), _value(command_set, PRIORITY, "us")]
    except _Unusual:
        return _pynetdicom_message_to_primitive(self)
    primitive = C_STORE()
    message_id, sop_class, sop_instance, priority = values
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
