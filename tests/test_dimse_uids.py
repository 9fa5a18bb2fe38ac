"""node/receive/dimse_uids.py: a UID that passed pynetdicom's checks is not checked again; others always are."""

from __future__ import annotations

import logging

import pytest
from pynetdicom.dimse_primitives import C_STORE

import node.receive.scp  # noqa: F401 - installs dimse_uids on import
from node.receive import dimse_uids


@pytest.fixture
def counted(monkeypatch):  # type: ignore[no-untyped-def]
    calls: list[object] = []
    inner = dimse_uids._pynetdicom_set_uid

    def counting(value, *args):  # type: ignore[no-untyped-def]
        calls.append(value)
        return inner(value, *args)

    monkeypatch.setattr(dimse_uids, "_pynetdicom_set_uid", counting)
    monkeypatch.setattr(dimse_uids, "_valid", {})
    return calls


def test_a_valid_uid_is_checked_once_and_primitives_get_it(counted):
    rq, rsp = C_STORE(), C_STORE()
    rq.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    rsp.AffectedSOPInstanceUID = rq.AffectedSOPInstanceUID
    assert rsp.AffectedSOPInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    assert counted == ["1.2.826.0.1.3680043.8.498.1"]


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_invalid_and_non_conformant_uids_are_checked_and_warned_about_every_time(counted, caplog):
    with caplog.at_level(logging.WARNING, logger="pynetdicom"):
        for _ in range(2):
            C_STORE().AffectedSOPInstanceUID = "1.2.abc"  # not a UID (pydicom's default: warn, keep it)
            C_STORE().AffectedSOPInstanceUID = "1.02.3"  # a leading zero: allowed, but warned about
    assert counted == ["1.2.abc", "1.02.3", "1.2.abc", "1.02.3"]
    assert sum("Non-conformant" in r.getMessage() for r in caplog.records if r.name == "pynetdicom.utils") == 4


def test_none_empty_and_bytes_go_to_pynetdicom(counted):
    p = C_STORE()
    p.AffectedSOPInstanceUID = None
    p.AffectedSOPClassUID = b"1.2.840.10008.5.1.4.1.1.2"
    assert p.AffectedSOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert counted == [None, b"1.2.840.10008.5.1.4.1.1.2"]


def test_the_memory_is_bounded(counted, monkeypatch):
    monkeypatch.setattr(dimse_uids, "REMEMBERED", 3)
    for i in range(7):
        dimse_uids.set_uid(f"1.2.3.{i + 1}", "uid")
    assert len(dimse_uids._valid) <= 3
