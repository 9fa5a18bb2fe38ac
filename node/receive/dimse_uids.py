"""UIDs of DIMSE primitives validated once per value rather than at every assignment.

pynetdicom checks each UID it puts into a DIMSE primitive (`set_uid`: a pydicom UID, its validator's
regular expression, then `UID.is_valid`'s). A received C-STORE has its SOP class and instance UIDs checked
when the request primitive is built, and the same two again when the response is: 4 checks an instance,
about 4% of the receiver's Python time (py-spy, bench/receive_rate.py --profile), for a SOP class UID that
is the same for a whole series and an instance UID seen a moment before.

Here a UID that passed every check is remembered (up to 1024, then they are forgotten at once), and the next assignment of the same
string takes the remembered UID. Anything else (None, empty, bytes, a non-conformant or invalid UID, whose
warning or error must be logged each time) goes through pynetdicom's `set_uid` unchanged. Only the DIMSE
primitives' module uses this; relies on pynetdicom 3's internals (pinned < 4).
"""

from __future__ import annotations

from pydicom.uid import UID
from pynetdicom import dimse_primitives
from pynetdicom.utils import set_uid as _pynetdicom_set_uid

REMEMBERED = 1024

_valid: dict[str, UID] = {}  # each get, set and clear is atomic under the GIL: no lock needed


def set_uid(value: None | str | bytes | UID, name: str, allow_empty: bool = True, allow_none: bool = True,
            validate: bool = True) -> UID | None:
    """pynetdicom.utils.set_uid, remembering the UIDs that passed."""
    if not (validate and value and isinstance(value, str)):
        return _pynetdicom_set_uid(value, name, allow_empty, allow_none, validate)
    key = str(value)
    known = _valid.get(key)
    if known is not None:
        return known
    uid = _pynetdicom_set_uid(value, name, allow_empty, allow_none, validate)  # raises for an invalid one
    if uid is not None and uid.is_valid:  # a non-conformant one is warned about again next time
        if len(_valid) >= REMEMBERED:
            _valid.clear()
        _valid[key] = uid
    return uid


def install() -> None:
    dimse_primitives.set_uid = set_uid  # type: ignore[assignment]
