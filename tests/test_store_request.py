"""node/receive/store_request.py: a C-STORE-RQ primitive read from the command set's bytes is the one
pynetdicom builds, and anything unusual is left to pynetdicom."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA

import node.receive.scp  # noqa: F401 - installs store_request on import
from node.receive import store_request

FIELDS = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
          "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID")


def _received(rq: C_STORE) -> DIMSEMessage:
    """The message as the receiving DIMSE provider has it once the last fragment is in."""
    sent = C_STORE_RQ()
    sent.primitive_to_message(rq)
    got = DIMSEMessage()
    for p in sent.encode_msg(3, 16384):
        got.decode_msg(p)
    last = P_DATA()
    last.presentation_data_value_list.append((3, b"\x02data set"))
    assert got.decode_msg(last)
    return got


def _request(**values) -> C_STORE:  # type: ignore[no-untyped-def]
    rq = C_STORE()
    rq.MessageID, rq.Priority = 7, 2
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.7"
    for k, v in values.items():
        setattr(rq, k, v)
    return rq


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("values, direct", [
    ({}, True),
    ({"MessageID": 65535, "Priority": 1}, True),
    ({"AffectedSOPInstanceUID": "1.2.3"}, True),  # odd length: a padding NUL
    ({"MoveOriginatorApplicationEntityTitle": "PACS", "MoveOriginatorMessageID": 3}, False),
    ({"AffectedSOPInstanceUID": "1.2.3\\4.5"}, False),  # two values: pynetdicom warns and takes the first
])
def test_the_primitive_is_the_one_pynetdicom_builds(monkeypatch, values, direct):  # type: ignore[no-untyped-def]
    slow: list[int] = []
    inner = store_request._pynetdicom_message_to_primitive
    monkeypatch.setattr(store_request, "_pynetdicom_message_to_primitive", lambda m: slow.append(1) or inner(m))
    rq = _request(**values)
    ours = store_request.message_to_primitive(_received(rq))
    theirs = inner(_received(rq))
    assert type(ours) is C_STORE
    assert {f: getattr(ours, f) for f in FIELDS} == {f: getattr(theirs, f) for f in FIELDS}
    assert ours.DataSet.getvalue() == theirs.DataSet.getvalue() == b"data set"
    assert ours._context_id == theirs._context_id == 3
    assert bool(slow) is not direct


def test_other_messages_are_left_to_pynetdicom():
    rq = C_ECHO()
    rq.MessageID, rq.AffectedSOPClassUID = 1, "1.2.840.10008.1.1"
    sent = C_ECHO_RQ()
    sent.primitive_to_message(rq)
    got = DIMSEMessage()
    for p in sent.encode_msg(1, 16384):
        assert got.decode_msg(p)
    echo = store_request.message_to_primitive(got)
    assert type(echo) is C_ECHO and echo.MessageID == 1
