"""InstitutionalDepartmentName of a stored study, read from one of its files.

Not a store column: create_all never adds a column to an existing SQLite file, so a new column would
break every node already installed (and a migration tool is more than one report needs). The header
of one instance is enough, since the attribute is the same for the whole study; reading it stops
before the pixel data. A purged study has no files left: the caller falls back to the calling AE.
"""

from __future__ import annotations

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from node.store.models import Instance

TAG = 0x00081040  # InstitutionalDepartmentName


def institutional_department(session, study_uid: str, series_uid: str | None = None) -> str | None:  # type: ignore[no-untyped-def]
    """The value in the first stored instance of `series_uid` (else of the study); None if absent or unreadable."""
    q = select(Instance.path).order_by(Instance.received_at).limit(1)
    q = q.where(Instance.series_uid == series_uid) if series_uid else q.where(Instance.study_uid == study_uid)
    path = session.scalar(q)
    if path is None:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[TAG])
    except (OSError, InvalidDicomError):
        return None
    value = ds.get(TAG)
    text = str(value.value).strip() if value is not None and value.value else ""
    return text or None
