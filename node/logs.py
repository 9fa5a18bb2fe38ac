"""Plain structured logs (key=value). They carry UIDs and AE titles, never patient names or IDs."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s", "%Y-%m-%dT%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs dataset summaries at INFO/DEBUG, which may hold patient data.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
