"""Library warnings and log lines that quote a data set's value do not put patient data into the logs."""

import logging
import warnings

import highdicom as hd

from node.logs import setup_logging


def test_library_warnings_and_log_lines_are_redacted(capsys):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("INFO")
    try:
        hd.valuerep.check_person_name("DOEJOHN")  # warns quoting the name
        logging.getLogger("pydicom").warning("Invalid value for VR PN: 'SMITH^ANNA' in %s", "PatientName")
        logging.getLogger("ainode.receive").info("stored sop_instance_uid=%s", "1.2.3")
    finally:
        logging.captureWarnings(False)
        warnings.resetwarnings()
        root.handlers[:], root.level = saved
    err = capsys.readouterr().err
    assert "DOEJOHN" not in err and "SMITH" not in err
    assert "unlikely to represent the intended person name" in err and "'<value>' in PatientName" in err
    assert "sop_instance_uid=1.2.3" in err  # the node's own lines are untouched


def test_pydicom_decoder_tracebacks_are_left_out(capsys, tmp_path):
    """pydicom logs a traceback per decoding plugin before it raises; the node reports the raised error."""
    import pydicom
    from pydicom.encaps import encapsulate

    from node.run.decode_pool import DecodeError, pixels_of
    from node.synth import write_chest_ct

    r = write_chest_ct(tmp_path / "ct", slices=10, rows=32, cols=32, transfer_syntax="RLELossless")
    ds = pydicom.dcmread(r.files[0])
    ds.PixelData = encapsulate([b"\x00" * 64])
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    setup_logging("INFO")
    try:
        try:
            pixels_of(ds, "slice.dcm")
        except DecodeError as exc:
            logging.getLogger("ainode.run").error("job failed error=%s", exc)
    finally:
        logging.captureWarnings(False)
        warnings.resetwarnings()
        root.handlers[:], root.level = saved
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "slice.dcm: its pixel data cannot be decoded" in err


def _lines(capsys, level: str, emit) -> str:  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("highdicom").level)
    setup_logging(level)
    try:
        emit()
    finally:
        logging.captureWarnings(False)
        warnings.resetwarnings()
        root.handlers[:], root.level = saved[:2]
        logging.getLogger("highdicom").setLevel(saved[2])
    return capsys.readouterr().err


def test_a_refused_outgoing_connection_is_one_warning_with_its_reason(capsys):
    """The node's own WARNING names the destination and retries; pynetdicom's two ERROR lines said neither."""
    from pynetdicom import AE

    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def emit() -> None:
        ae = AE(ae_title="AINODE")
        ae.add_requested_context("1.2.840.10008.1.1")
        assert not ae.associate("127.0.0.1", port, ae_title="PACS").is_established
        ae.shutdown()

    err = _lines(capsys, "INFO", emit)
    assert "level=ERROR" not in err
    assert "unable to connect to remote" not in err
    assert "level=WARNING logger=pynetdicom.transport msg=TCP Initialisation Error: [Errno 111]" in err


def test_highdicom_s_per_object_info_lines_only_at_debug(capsys):
    def emit() -> None:
        logging.getLogger("highdicom.base").info("copy attributes of module %s", "Patient")
        logging.getLogger("highdicom.base").warning("a highdicom warning")

    at_info = _lines(capsys, "INFO", emit)
    assert "copy attributes" not in at_info and "a highdicom warning" in at_info
    assert "copy attributes" in _lines(capsys, "DEBUG", emit)


def test_each_pydicom_warning_is_one_record_and_every_warning_one_line(capsys):
    """pydicom logs a warning and warns it too (warn_and_log): once in the log, not twice; and a library
    warning's source line does not follow it on a line of its own."""
    import highdicom as hd
    from pydicom.dataset import Dataset

    def emit() -> None:
        Dataset().SOPInstanceUID = "1.2.abc"
        hd.valuerep.check_person_name("DOEJOHN")

    err = _lines(capsys, "INFO", emit)
    lines = err.splitlines()
    assert len([x for x in lines if "Invalid value for VR UI" in x]) == 1
    assert all(x.startswith("ts=") for x in lines) and "warn_and_log" not in err
    assert sum("unlikely to represent the intended person name" in x for x in lines) == 1
    assert "DOEJOHN" not in err and "abc" not in err
