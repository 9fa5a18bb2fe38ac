"""node/receive/store_request.py: a C-STORE-RQ primitive read from the command set's bytes is the one
pynetdicom builds, and anything unusual is left to pynetdicom."""

from __future__ import annotations

import errno
import os
from io import BytesIO

import pytest
from pynetdicom import evt
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu_primitives import P_DATA

import node.receive.scp  # noqa: F401 - installs store_request on import
from node.receive import store_request
from node.receive.spill import SpillFile

FIELDS = ("MessageID", "AffectedSOPClassUID", "AffectedSOPInstanceUID", "Priority",
          "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID")


class _Assoc:
    """What decode_msg asks of the association: the listeners bound to an event, the receiver's data set
    maker (a CappedDataSet of `limit`; the request values it was asked with are in `asked`), the accepted
    context's transfer syntax."""

    def __init__(self, *handlers: object, limit: int | None = None) -> None:
        self.handlers = list(handlers)
        self.asked: list[tuple[object, ...]] = []
        self.ae = type("AE", (), {"ainode_new_data_set": None if limit is None else self._new})()
        self.limit = limit
        self._accepted_cx = {3: type("Context", (), {"transfer_syntax": ["1.2.840.10008.1.2.1"]})()}

    def _new(self, *request: object) -> store_request.CappedDataSet:
        self.asked.append(request)
        return store_request.CappedDataSet(self.limit)  # type: ignore[arg-type]

    def get_handlers(self, event: object) -> list[object]:
        return self.handlers if event is evt.EVT_DIMSE_RECV else []


QUIET = _Assoc()


def _sent(rq: C_STORE) -> list[P_DATA]:
    sent = C_STORE_RQ()
    sent.primitive_to_message(rq)
    return list(sent.encode_msg(3, 16384))


def _received(rq: C_STORE) -> DIMSEMessage:
    """The message as the receiving DIMSE provider has it once the last fragment is in."""
    got = DIMSEMessage()
    for p in _sent(rq):
        if p.presentation_data_value_list[0][1][0] & 1:  # the command set's fragments; the data set's below
            assert not got.decode_msg(p, QUIET)
    last = P_DATA()
    last.presentation_data_value_list.append((3, b"\x02data set"))
    assert got.decode_msg(last, QUIET)
    return got


def _request(**values) -> C_STORE:  # type: ignore[no-untyped-def]
    rq = C_STORE()
    rq.MessageID, rq.Priority = 7, 2
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.7"
    rq.DataSet = BytesIO(b"data set")  # the command set then says a data set follows
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
        assert got.decode_msg(p, QUIET)
    echo = store_request.message_to_primitive(got)
    assert type(echo) is C_ECHO and echo.MessageID == 1


def _command_bytes(rq: C_STORE) -> bytes:
    return b"".join(bytes(d[1:]) for p in _sent(rq) for _, d in p.presentation_data_value_list if d[0] & 1)


def test_a_plain_request_is_read_from_its_bytes_and_its_command_set_decoded_only_when_asked():
    got = _received(_request())
    assert type(got) is store_request.PlainStoreRQ
    assert isinstance(got, C_STORE_RQ)
    assert "_command_set" not in got.__dict__
    theirs = DIMSEMessage()
    for p in _sent(_request()):
        if store_request._pynetdicom_decode_msg(theirs, p):
            break
    assert type(theirs) is C_STORE_RQ
    assert got.command_set == theirs.command_set  # decoded from the same bytes on first access
    assert got.context_id == theirs.context_id == 3



def test_a_command_set_in_pieces_takes_pynetdicoms_path():
    first, *rest = _sent(_request())
    (cx, whole), = first.presentation_data_value_list
    got = DIMSEMessage()
    for part in (bytes([0x01]) + bytes(whole[1:20]), bytes([0x03]) + bytes(whole[20:])):
        p = P_DATA()
        p.presentation_data_value_list.append((cx, part))
        assert not got.decode_msg(p, QUIET)
    assert type(got) is C_STORE_RQ
    last = P_DATA()
    last.presentation_data_value_list.append((3, b"\x02data set"))
    assert got.decode_msg(last, QUIET)
    assert store_request.message_to_primitive(got).AffectedSOPInstanceUID == "1.2.826.0.1.3680043.8.498.7"


def test_data_set_fragments_in_the_command_sets_pdu_are_taken_in():
    (command,), data = _sent(_request())[0].presentation_data_value_list, (3, b"\x02data set")
    p = P_DATA()
    p.presentation_data_value_list.extend([command, data])
    got = DIMSEMessage()
    assert got.decode_msg(p, QUIET)
    primitive = store_request.message_to_primitive(got)
    assert type(got) is store_request.PlainStoreRQ and primitive.DataSet.getvalue() == b"data set"


def test_what_plain_command_leaves_to_pynetdicom():
    raw = _command_bytes(_request())
    assert store_request.plain_command(raw) == (7, "1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.7", 2)

    def element(group: int, elem: int, value: bytes) -> bytes:
        return group.to_bytes(2, "little") + elem.to_bytes(2, "little") + len(value).to_bytes(4, "little") + value

    no_data_set = raw.replace(element(0, 0x0800, (0x0001).to_bytes(2, "little")),
                              element(0, 0x0800, (0x0101).to_bytes(2, "little")))
    assert no_data_set != raw
    echo = raw.replace(element(0, 0x0100, (0x0001).to_bytes(2, "little")),
                       element(0, 0x0100, (0x0030).to_bytes(2, "little")))
    assert echo != raw
    for bad in (raw[:-3],  # cut short: the last value runs past the end
                raw + b"\x00" * 5,  # trailing bytes shorter than an element header
                raw + element(0, 0x0110, b"\x01\x00"),  # an element twice
                raw + element(8, 0x0018, b"1.2"),  # not group 0000
                raw + element(0, 0x0600, b"AE"),  # not a plain C-STORE-RQ element (Move Destination)
                raw.replace(element(0, 0x0700, b"\x02\x00"), element(0, 0x0700, b"\x02\x00\x00\x00")),  # US of 4
                no_data_set, echo):
        assert store_request.plain_command(bad) is None


def test_with_a_listener_for_received_messages_bound_pynetdicom_decodes_the_command_set():
    got = DIMSEMessage()
    assert not got.decode_msg(_sent(_request())[0], _Assoc(lambda event: None))
    assert type(got) is C_STORE_RQ


def test_a_capped_data_set_keeps_up_to_its_limit_and_then_only_counts():
    buf = store_request.CappedDataSet(10)
    assert buf.write(b"12345") == 5 and buf.write(b"67890") == 5
    assert (buf.getvalue(), buf.over, buf.received) == (b"1234567890", False, 10)  # the limit itself is kept
    assert buf.write(b"x") == 1
    assert (buf.getvalue(), buf.over, buf.received) == (b"", True, 11)  # what it held is let go
    buf.write(b"y" * 1000)
    assert (buf.getvalue(), buf.received) == (b"", 1011)


def test_a_data_set_past_the_aes_limit_is_counted_not_held():
    got = DIMSEMessage()
    assoc = _Assoc(limit=6)
    assert not got.decode_msg(_sent(_request())[0], assoc)
    assert assoc.asked == [("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.7", "1.2.840.10008.1.2.1")]
    for fragment in (b"\x00" + b"a" * 4, b"\x02" + b"b" * 4):  # 8 bytes in all, past the limit of 6
        p = P_DATA()
        p.presentation_data_value_list.append((3, fragment))
        done = got.decode_msg(p, QUIET)
    assert done
    primitive = store_request.message_to_primitive(got)
    assert isinstance(primitive.DataSet, store_request.CappedDataSet)
    assert (primitive.DataSet.over, primitive.DataSet.received, primitive.DataSet.getvalue()) == (True, 8, b"")


def _spill_to(tmp_path):  # type: ignore[no-untyped-def]
    opened: list[SpillFile] = []

    def open_spill() -> SpillFile:
        path = tmp_path / f"{len(opened)}.part"
        opened.append(SpillFile(path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL), b"META"))
        return opened[-1]
    return opened, open_spill


def test_past_its_spill_size_a_data_set_goes_on_in_a_file_that_starts_with_its_file_meta(tmp_path):
    opened, open_spill = _spill_to(tmp_path)
    buf = store_request.CappedDataSet(100, 6, open_spill)
    buf.write(b"12345")
    buf.write(memoryview(b"678"))  # 8 > 6: what was held, then this, go to the file
    buf.write(b"90")
    assert (buf.getvalue(), buf.received, buf.spill) == (b"", 10, opened[0])
    assert bytes(buf.spill.data_set()) == b"1234567890"
    path = buf.spill.sync()
    assert path.read_bytes() == b"META1234567890"
    buf.spill.close()
    assert path.exists()  # synced: the caller renames it, nothing deletes it


def test_a_spilled_data_set_past_its_limit_loses_its_file_and_one_never_taken_is_deleted(tmp_path):
    opened, open_spill = _spill_to(tmp_path)
    buf = store_request.CappedDataSet(10, 4, open_spill)
    buf.write(b"12345")
    buf.write(b"678901")  # past the limit of 10
    assert (buf.over, buf.spill, buf.received) == (True, None, 11)
    assert not list(tmp_path.iterdir())
    dropped = store_request.CappedDataSet(100, 4, open_spill)
    dropped.write(b"12345")
    assert list(tmp_path.iterdir()) == [opened[1].path]
    del dropped, opened[:]  # an association aborted mid-data-set: nothing holds it any more
    assert not list(tmp_path.iterdir())


def test_a_spill_file_that_cannot_be_written_is_kept_as_the_error_and_the_rest_only_counted():
    def full() -> SpillFile:
        raise OSError(errno.ENOSPC, "No space left on device")

    buf = store_request.CappedDataSet(100, 4, full)
    buf.write(b"12345")
    buf.write(b"678")
    assert isinstance(buf.failed, OSError) and buf.failed.errno == errno.ENOSPC
    assert (buf.getvalue(), buf.received, buf.spill) == (b"", 8, None)
