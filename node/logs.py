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


class OneLineWarnings(logging.Filter):
    """A library warning reaches the log as Python formats it: "file:line: Category: text" and then the source
    line that warned, on a line of its own. Only the first line is kept, so every record is one line. pydicom
    logs each of its warnings itself and then also warns (pydicom.misc.warn_and_log): the warning's echo,
    which shows that call as its source line, is dropped, leaving one record per pydicom warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "py.warnings":
            return True
        text = record.getMessage()
        first, _, rest = text.partition("\n")
        if "/pydicom/" in first and rest.strip().startswith("warn_and_log("):
            return False
        record.msg, record.args = first, None
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


class DemoteConnectFailures(logging.Filter):
    """pynetdicom logs an outgoing connection that fails (refused, timed out, no route) as two ERROR lines
    that do not say to where. The node retries such a send with back-off, logs each failure as a WARNING
    that names the destination (dispatch, find, priors, commitment), and logs an ERROR when it gives up. So
    the first line is dropped and the second, which holds the reason, becomes a WARNING: a PACS restart is
    not an error for IT to chase."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "pynetdicom.transport" or record.levelno != logging.ERROR:
            return True
        message = record.getMessage()
        if message == "Association request failed: unable to connect to remote":
            return False
        if message.startswith("TCP Initialisation Error"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s", "%Y-%m-%dT%H:%M:%S"))
    handler.addFilter(OneLineWarnings())
    handler.addFilter(RedactLibraryValues())
    handler.addFilter(DropDecoderTracebacks())
    handler.addFilter(DropLostConnectionErrors())
    handler.addFilter(DemoteConnectFailures())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Their INFO lines only at DEBUG: highdicom logs about eight per SEG or SR it builds ("copy attributes of
    # module ..."), more than all of the node's own lines in a day's log; alembic says "Context impl
    # SQLiteImpl." and "Will assume non-transactional DDL." at every start (the store logs its own line when
    # it upgrades the schema, node/store/migrate.py). Nothing IT can act on.
    for name in ("highdicom", "alembic"):
        logging.getLogger(name).setLevel(logging.NOTSET if root.level <= logging.DEBUG else logging.WARNING)
    logging.captureWarnings(True)  # library warnings go through the handler above, redacted
    # pynetdicom logs dataset summaries at INFO/DEBUG, which may hold patient data.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # Its "standard" event handlers format every PDU and DIMSE message for those INFO/DEBUG lines, which
    # the level above drops: about 1 ms of CPU per received instance for nothing. Read when an
    # association starts, so this must run before the node listens.
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
