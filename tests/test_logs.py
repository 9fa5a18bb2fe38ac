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
