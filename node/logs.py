"""Plain structured logs (key=value). They carry UIDs and AE titles, never patient names or IDs."""

from __future__ import annotations

import logging
import re
import sys

from pynetdicom import _config as pynetdicom_config

# Libraries quote the offending value in their warnings ("The string 'DOE' is unlikely to represent the
# intended person name", "Invalid value for VR PN: 'DOE^JOHN...'"): a patient name or ID can be that value.
_LIBRARIES = ("pydicom", "highdicom", "pynetdicom", "py.warnings")
_QUOTED = re.compile(r"""(['"])(?:(?!\1).){1,512}?\1""")


class RedactLibraryValues(logging.Filter):
    """Replaces quoted values in library log records (and warnings) with <value>."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in _LIBRARIES or record.name == "py.warnings":
            record.msg = _QUOTED.sub(r"\1<value>\1", record.getMessage())
            record.args = None
        return True


class DropDecoderTracebacks(logging.Filter):
    """pydicom logs a traceback for each decoding plugin that fails on a frame, then raises an error that
    names every plugin's failure; the node reports that error (with the file) where it matters. The
    tracebacks only fill the log, and a worker that reads arriving files ahead would log one per bad file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.name.startswith("pydicom.pixels.decoders"))


class DropLostConnectionErrors(logging.Filter):
    """pynetdicom logs a peer's dropped connection as errors and a traceback ("Connection closed before the
    entire PDU was received", the OSError, "The received PDU is shorter than expected"). A modality that
    restarts or a cable pulled is not the node's error, and the node says what it means where it knows the
    peer: a warning naming the calling AE when a received association ends without release
    (receive/scp.py), a failed send naming the destination (dispatch)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "pynetdicom.dul":
            return True
        if record.exc_info and isinstance(record.exc_info[1], (OSError, TimeoutError)):
            return False
        message = record.getMessage()
        return not (message == "Connection closed before the entire PDU was received"
                    or message.startswith("The received PDU is shorter than expected"))


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s", "%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(RedactLibraryValues())
    handler.addFilter(DropDecoderTracebacks())
    handler.addFilter(DropLostConnectionErrors())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)  # library warnings go through the handler above, redacted
    # pynetdicom logs dataset summaries at INFO/DEBUG, which may hold patient data.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Its "standard" event handlers format every PDU and DIMSE message for those INFO/DEBUG lines, which
    # the level above drops: about 1 ms of CPU per received instance for nothing. Read when an
    # association starts, so this must run before the node listens.
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
