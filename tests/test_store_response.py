"""The directly encoded C-STORE-RSP Success (node/receive/store_response.py) is byte for byte what pynetdicom
encodes, and every other response is left to pynetdicom."""

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from node.receive.store_response import _plain_success, success_command_set

CT = "1.2.840.10008.5.1.4.1.1.2"


def response(sop_uid: str, msg_id: int, status: int = 0x0000, comment: str | None = None) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageID = msg_id
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = sop_uid
    rsp.Status = status
    if comment:
        rsp.ErrorComment = comment
    return rsp


def pynetdicom_bytes(rsp: C_STORE) -> bytes:
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    [pdata] = list(msg.encode_msg(1, 16384))
    [(context_id, pdv)] = pdata.presentation_data_value_list
    assert context_id == 1 and pdv[:1] == b"\x03"
    return pdv[1:]


@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498." + "1" * 38])
@pytest.mark.parametrize("msg_id", [1, 255, 65535])
def test_success_is_what_pynetdicom_encodes(sop_uid, msg_id):
    rsp = response(sop_uid, msg_id)
    assert _plain_success(rsp)
    assert success_command_set(CT, msg_id, sop_uid) == pynetdicom_bytes(rsp)


def test_failures_warnings_and_comments_go_through_pynetdicom():
    assert not _plain_success(response("1.2.3", 1, 0xA700, "spool disk full"))
    assert not _plain_success(response("1.2.3", 1, 0xB000))
    assert not _plain_success(response("1.2.3", 1, 0x0000, "a comment"))
    no_uid = response("1.2.3", 1)
    no_uid.AffectedSOPInstanceUID = None
    assert not _plain_success(no_uid)
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = "1.2.3"
    assert not _plain_success(request)  # a request, not a response


def test_the_receiver_installs_it():
    from pynetdicom.dimse import DIMSEServiceProvider

    import node.receive.scp  # noqa: F401 - installs it on import
    from node.receive import store_response

    assert DIMSEServiceProvider.send_msg is store_response.send_msg


@pytest.mark.parametrize("context_id", [1, 127, 255])
def test_the_pdu_sent_directly_is_what_pynetdicom_encodes(context_id):
    from pynetdicom.pdu import P_DATA_TF
    from pynetdicom.pdu_primitives import P_DATA

    from node.receive.store_response import LAST_COMMAND_FRAGMENT, p_data_tf

    command = success_command_set(CT, 7, "1.2.3.4.5")
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, LAST_COMMAND_FRAGMENT + command))
    assert p_data_tf(context_id, command) == P_DATA_TF(pdata).encode()
