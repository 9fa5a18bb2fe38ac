"""A received data set as a DICOM file, and its header, without pydicom's per-call costs.

pydicom encodes the File Meta Information anew for every instance (about 0.8 ms, as much as the fsync
of the file on a fast disk) although it differs between instances of one sender only in the SOP
Instance UID. `part10_prefix` has pydicom encode it once per (SOP class, transfer syntax, UID length)
and puts each instance's UID into a copy of those bytes. `read_header` decodes the data set's
elements up to the pixel data straight from the received bytes, instead of parsing a File Meta
Information that was just made.
"""

from __future__ import annotations

import functools
import re
import zlib
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pynetdicom.dsutils import create_file_meta, encode_file_meta

PREAMBLE = b"\x00" * 128 + b"DICM"
_UID = re.compile(r"[0-9.]{1,64}")
_MEDIA_SOP_INSTANCE = b"\x02\x00\x03\x00UI"  # (0002,0003) Media Storage SOP Instance UID, explicit VR LE


@functools.lru_cache(maxsize=512)
def _template(sop_class_uid: str, transfer_syntax: str, uid_length: int) -> tuple[bytes, int]:
    """Preamble + File Meta Information as pydicom encodes it for a placeholder instance UID of
    `uid_length` characters, and where that UID's value starts."""
    meta = create_file_meta(sop_class_uid=UID(sop_class_uid), sop_instance_uid=UID("9" * uid_length),
                            transfer_syntax=UID(transfer_syntax))
    encoded = PREAMBLE + encode_file_meta(meta)
    at = encoded.index(_MEDIA_SOP_INSTANCE) + 8  # tag (4), VR (2), 2-byte length
    return encoded, at


def part10_prefix(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble and File Meta Information for a data set received with these request values: the same
    bytes as pynetdicom's `Event.encoded_dataset()` puts before the data set."""
    if not (_UID.fullmatch(sop_instance_uid) and _UID.fullmatch(sop_class_uid)):
        # A malformed request UID (the SCP refuses such an instance after the header check): the slow way.
        meta = create_file_meta(sop_class_uid=UID(sop_class_uid), sop_instance_uid=UID(sop_instance_uid),
                                transfer_syntax=UID(transfer_syntax))
        return PREAMBLE + encode_file_meta(meta)
    template, at = _template(sop_class_uid, transfer_syntax, len(sop_instance_uid))
    uid = sop_instance_uid.encode("ascii")
    return template[:at] + uid + template[at + len(uid):]


_PIXEL_DATA_TAGS = {0x7FE00008, 0x7FE00009, 0x7FE00010}  # float, double float, pixel data: as dcmread stops


def _at_pixel_data(tag: int, vr: str | None, length: int) -> bool:
    return tag in _PIXEL_DATA_TAGS


def read_header(data_set: bytes, transfer_syntax: UID) -> Dataset:
    """The data set's elements before the pixel data, decoded lazily as pydicom does (values convert
    on first access). `data_set` is the data set as received, without preamble or File Meta Information.
    Raises what pydicom raises for bytes it cannot decode."""
    if transfer_syntax == DeflatedExplicitVRLittleEndian:  # checks.scan has bounded its inflated size
        data_set = zlib.decompress(data_set, -zlib.MAX_WBITS)
    return read_dataset(BytesIO(data_set), transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                        stop_when=_at_pixel_data)
