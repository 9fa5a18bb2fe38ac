"""Sanity checks on a received data set, made before anything is written.

pydicom reads leniently: a data set cut off in the middle of an element decodes
without an error (the last value is just short), a UID sent with the VR US
decodes as a number, and values are converted only when first used. The spool
would then hold an instance that breaks later, in the assembler or a plugin,
long after the sender was told Success. These checks find such data sets while
the sender can still be told why.

Each check raises one of three exceptions; the SCP maps them to DIMSE statuses:
`CannotUnderstand` (0xC000), `DoesNotMatch` (0xA900), `TooLarge` (0xA700).
Reasons name attributes and UIDs, never other values: they go to logs.
"""

from __future__ import annotations

import functools
import re
import struct
import zlib
from typing import TYPE_CHECKING, Callable, NamedTuple

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

from node.receive.spool import BadUID, check_uid

if TYPE_CHECKING:
    from node.receive.spill import SpillFile


class CannotUnderstand(ValueError):
    """The bytes cannot be decoded as the negotiated transfer syntax says."""


class DoesNotMatch(ValueError):
    """The data set decodes but contradicts itself (pixel data and its description)."""


class TooLarge(ValueError):
    """The data set, once inflated, is larger than the configured limit."""


class NoRoom(TooLarge):
    """No room on the spool disk (storage.min_free_mb) to inflate the data set into."""


class Element(NamedTuple):
    """Where a top-level element sits, as encoded: enough to check it without decoding its value. (A tuple:
    scan makes one per top-level element of every instance received, and a frozen dataclass costs twice as much.)"""

    vr: str | None  # as encoded; None in implicit VR
    length: int | None  # None: undefined length
    items: int  # items directly inside an undefined-length value (for pixel data: offset table + fragments)
    at: int = 0  # where its value starts in Scanned.body


class Scanned(dict):  # type: ignore[type-arg] # dict[int, Element]
    """What `scan` found: the top-level elements by tag, and `body`, the bytes they lie in (the inflated
    data set, for a deflated transfer syntax)."""

    body: bytes | memoryview = b""


ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
# Explicit VR: these have two reserved bytes and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
SHORT_VRS = {"AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "PN", "SH", "SL", "SS",
             "ST", "TM", "UI", "UL", "US"}
_VR_OF = {vr.encode(): (vr, vr in LONG_VRS) for vr in LONG_VRS | SHORT_VRS}  # as encoded: (VR, 4-byte length)
MAX_DEPTH = 32  # nested undefined-length sequences; deeper is an attack or garbage, not an image


class _Walker:
    """Hops from element header to element header; never reads a value."""

    def __init__(self, buf: bytes, implicit: bool, little: bool) -> None:
        self.buf = buf
        self.implicit = implicit
        e = "<" if little else ">"
        self.tag_len = struct.Struct(f"{e}HHL").unpack_from  # implicit VR, and items in both
        self.explicit = struct.Struct(f"{e}HH2sH").unpack_from
        self.long_len = struct.Struct(f"{e}L").unpack_from

    def header(self, pos: int, end: int) -> tuple[int, str | None, int, int]:
        """(tag, vr, length, position of the value) of the element at `pos`."""
        if end - pos < 8:
            raise CannotUnderstand(f"data set ends inside an element header at byte {pos}")
        group, elem, length = self.tag_len(self.buf, pos)
        tag = group << 16 | elem
        if self.implicit or group == 0xFFFE:
            return tag, None, length, pos + 8
        _, _, raw_vr, short = self.explicit(self.buf, pos)
        known = _VR_OF.get(raw_vr)
        if known is None:
            raise CannotUnderstand(f"element ({group:04X},{elem:04X}) has an unknown VR at byte {pos}")
        vr, long = known
        if not long:
            return tag, vr, short, pos + 8
        if end - pos < 12:
            raise CannotUnderstand(f"data set ends inside an element header at byte {pos}")
        return tag, vr, self.long_len(self.buf, pos + 8)[0], pos + 12

    def elements(self, pos: int, end: int, depth: int, *, until: int | None = None,
                 top: dict[int, Element] | None = None) -> int:
        """Walk elements from `pos`; stop at `end` or after the delimiter `until`. Returns the end position."""
        if depth > MAX_DEPTH:
            raise CannotUnderstand(f"sequences nested deeper than {MAX_DEPTH}")
        while pos < end:
            tag, vr, length, pos = self.header(pos, end)
            at = pos
            if tag == until:
                return pos
            if tag in (ITEM, ITEM_END, SEQUENCE_END):
                raise CannotUnderstand(f"unexpected item or delimiter at byte {pos - 8}")
            items = 0
            if length == 0xFFFFFFFF:
                pos, items = self.items(pos, end, depth + 1)
            elif length > end - pos:
                raise CannotUnderstand(f"data set ends inside the value of ({tag >> 16:04X},{tag & 0xFFFF:04X}): "
                                       f"{length} bytes announced, {end - pos} left")
            else:
                pos += length
            if top is not None:
                top[tag] = Element(vr, None if length == 0xFFFFFFFF else length, items, at)
        if until is not None:
            raise CannotUnderstand("data set ends inside an undefined-length value")
        return pos

    def items(self, pos: int, end: int, depth: int) -> tuple[int, int]:
        """Walk the items of an undefined-length value up to its sequence delimiter."""
        count = 0
        while True:
            tag, _, length, pos = self.header(pos, end)
            if tag == SEQUENCE_END:
                return pos, count
            if tag != ITEM:
                raise CannotUnderstand(f"expected an item at byte {pos - 8}")
            count += 1
            if length == 0xFFFFFFFF:
                pos = self.elements(pos, end, depth, until=ITEM_END)
            elif length > end - pos:
                raise CannotUnderstand(f"data set ends inside an item: {length} bytes announced, {end - pos} left")
            else:
                pos += length


INFLATE_STEP = 4 * 2**20  # inflated this much at a time (zlib holds up to twice it meanwhile): a size past the
# limits stops it early, and past the disk size it passes through memory a piece at a time


def scan(data_set: bytes | memoryview, transfer_syntax: UID, max_bytes: int, *,
         inflate_to_disk_above: int | None = None, open_spill: Callable[[], SpillFile] | None = None) -> Scanned:
    """Check that every element of a data set, as a C-STORE carries it (no preamble, no file meta), lies
    wholly inside it; the top-level elements by tag.

    Catches what pydicom reads without complaint: truncation anywhere (in a header, in a value, in a
    sequence), an unknown explicit VR, garbage after the last element. A deflated data set is inflated
    first, up to `max_bytes` (a small deflated stream can inflate to gigabytes); past
    `inflate_to_disk_above` bytes into the spill file `open_spill()` gives (without a prefix), read through
    its read-only map.
    The receiver scans the data set itself, not the file it writes (file meta + data set): building that in
    memory copied 0.5 MB per CT slice under the GIL.
    """
    body = data_set
    if transfer_syntax.is_deflated:
        body = _inflate(data_set, max_bytes, inflate_to_disk_above, open_spill)
    top = Scanned()
    _Walker(body, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian).elements(0, len(body), 0, top=top)
    top.body = body
    return top


def _inflate(data: bytes | memoryview, max_bytes: int, to_disk_above: int | None,
             open_spill: Callable[[], SpillFile] | None) -> bytes | memoryview:
    """The deflated data set inflated: in memory, or past `to_disk_above` bytes in a spill file (it asks for
    room against storage.min_free_mb as it grows), deleted once mapped. A 2 MB deflated stream can inflate to
    node.max_dataset_mb (2 GB by default), and every association may send one at once."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    pieces: list[bytes] = []
    spill: SpillFile | None = None
    total = 0
    pending: bytes | memoryview = data
    try:
        while not inflater.eof:
            try:
                piece = inflater.decompress(pending, INFLATE_STEP)
            except zlib.error as exc:
                raise CannotUnderstand("deflated data set does not inflate") from exc
            got = len(piece)
            total += got
            if total > max_bytes:
                raise TooLarge(f"inflated data set larger than {max_bytes // 2**20} MB")
            try:
                if spill is None and open_spill is not None and to_disk_above is not None and total > to_disk_above:
                    spill = open_spill()
                    for held in pieces:
                        spill.write(held)
                    pieces = []
                if spill is not None:
                    spill.write(piece)
                else:
                    pieces.append(piece)
            except OSError as exc:  # a full disk, or below storage.min_free_mb: as for any instance, 0xA700
                raise NoRoom(f"cannot inflate the deflated data set in the spool: {exc.strerror}") from None
            piece = b""  # not held while the next piece is inflated
            pending = inflater.unconsumed_tail
            if got < INFLATE_STEP:  # not cut by the step: the input is used up (more output only at a step)
                break
        if not inflater.eof:
            raise CannotUnderstand("deflated data set is cut short")
        return b"".join(pieces) if spill is None else spill.data_set()  # the map outlives the file's close
    finally:
        if spill is not None:
            spill.close()  # deleted now; its pages stay mapped while the data set is read


@functools.cache
def tag_of(keyword: str) -> BaseTag:
    """Tag(keyword) costs microseconds a call, and the receiver asks for the same few keywords many times
    per instance (about 0.5 ms in all, as much as the rest of the checks)."""
    return Tag(keyword)


_dictionary_vr = functools.cache(dictionary_VR)


def _encoded_vr(ds: Dataset, keyword: str) -> str | None:
    """The VR the element was sent with, without converting its value (None in implicit VR)."""
    return ds.get_item(tag_of(keyword)).VR


def _value(ds: Dataset, keyword: str) -> object:
    """The element's value (converted now, so a conversion error raises here), or None if absent."""
    elem = ds.get(tag_of(keyword))
    return None if elem is None else elem.value


UID_KEYWORDS = [("SOPInstanceUID", "(0008,0018)"), ("StudyInstanceUID", "(0020,000D)"),
                ("SeriesInstanceUID", "(0020,000E)"), ("SOPClassUID", "(0008,0016)")]

# raw_ui / raw_us: an element that is still as read from the bytes, of a VR whose value needs no
# character set (UI) or is one 2-byte number (US), is decoded here rather than by pydicom's conversion (about
# 8 µs each: a DataElement, its validation, the dataset updated; 8 of them in a received instance's header,
# 4 in its C-STORE-RQ command set: node/receive/store_request.py). Anything else (converted already, another
# VR, UN, an unusual length) is left to pydicom's conversion as before: they return CONVERT.
CONVERT = object()


def raw_ui(ds: Dataset, tag: BaseTag | int) -> object:
    """A UI element's value as pydicom decodes it (Latin-1, trailing blanks and NULs stripped), None if the
    element is absent, or CONVERT."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if type(elem) is RawDataElement and elem.value is not None and elem.VR in (None, "UI"):
        return elem.value.decode("latin-1").rstrip(" \x00")
    return CONVERT


def raw_us(ds: Dataset, tag: BaseTag | int) -> object:
    """A single US value, None if the element is absent, or CONVERT."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if type(elem) is RawDataElement and elem.value is not None and elem.VR in (None, "US") and len(elem.value) == 2:
        return int.from_bytes(elem.value, "little" if elem.is_little_endian else "big")
    return CONVERT


_PLAIN_TEXT = re.compile(rb"[ -\[\]-~]*")  # printable ASCII but the backslash (which separates values)


def raw_text(ds: Dataset, tag: BaseTag) -> object:
    """A text element's value as the store row takes it (node/receive/header.py): stripped, None if absent or
    empty; or CONVERT.

    Decoded here while still raw, sent with its own VR (or implicit), and its bytes printable ASCII without a
    backslash (trailing NULs allowed): such bytes read the same in every character set DICOM names, hold one
    value, and convert without an error or a warning. Anything else is left to pydicom (CONVERT)."""
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if type(elem) is RawDataElement and elem.VR in (None, _dictionary_vr(tag)):
        value = elem.value
        if value is None:
            return None
        if type(value) is bytes and _PLAIN_TEXT.fullmatch(value := value.rstrip(b"\x00")):
            return value.decode("ascii").strip() or None
    return CONVERT


def identity(ds: Dataset) -> tuple[str, str, str, str]:
    """SOP instance, study, series and SOP class UIDs, each safe to use as a file name.

    A UID sent with another VR is refused rather than converted: US would turn it into a number
    that happens to pass as digits.
    """
    out = []
    for keyword, tag in UID_KEYWORDS:
        name = f"{keyword} {tag}"
        value = raw_ui(ds, tag_of(keyword))
        if value is CONVERT:
            if _encoded_vr(ds, keyword) not in (None, "UI", "UN"):
                raise CannotUnderstand(f"{name} is encoded with VR {_encoded_vr(ds, keyword)}, not UI")
            try:
                value = _value(ds, keyword)
            except Exception as exc:  # noqa: BLE001 - pydicom's conversion errors vary by VR
                raise CannotUnderstand(f"{name} cannot be decoded ({type(exc).__name__})") from exc
        elif value is not None and "\\" in value:  # type: ignore[operator]
            value = value.split("\\")  # type: ignore[attr-defined] # several values: refused below
        if value is not None and not isinstance(value, str):
            raise CannotUnderstand(f"{name} is not a single UID")
        try:
            out.append(check_uid(value, name))
        except BadUID as exc:
            raise CannotUnderstand(str(exc)) from exc
    return out[0], out[1], out[2], out[3]


def _int(ds: Dataset, keyword: str, vr: str, default: int | None = None) -> int:
    """A single integer attribute that the pixel data's size depends on."""
    if vr == "US" and type(raw := raw_us(ds, tag_of(keyword))) is int:
        return raw
    if tag_of(keyword) not in ds:
        if default is not None:
            return default
        raise DoesNotMatch(f"pixel data present but {keyword} is missing")
    if _encoded_vr(ds, keyword) not in (None, vr, "UN"):
        raise CannotUnderstand(f"{keyword} is encoded with VR {_encoded_vr(ds, keyword)}, not {vr}")
    try:
        value = ds[tag_of(keyword)].value
    except Exception as exc:  # noqa: BLE001 - e.g. a US value of 3 bytes
        raise CannotUnderstand(f"{keyword} cannot be decoded ({type(exc).__name__})") from exc
    if value is None or value == "":
        if default is not None:
            return default
        raise DoesNotMatch(f"pixel data present but {keyword} is empty")
    if not isinstance(value, int) or isinstance(value, bool):
        raise CannotUnderstand(f"{keyword} is not a single integer")
    return int(value)


def check_pixel_data(ds: Dataset, elements: dict[int, Element], transfer_syntax: UID) -> None:
    """Pixel data must be as long as Rows, Columns, samples, bits and frames say (native syntaxes),
    or hold at least one fragment (encapsulated ones).

    A short or long native pixel data element is a sender bug that would otherwise surface as a
    reshape error in a worker, or worse as a shifted image. Only header lengths are used: no pixel
    value is read, nothing is decompressed.
    """
    pixel = elements.get(PIXEL_DATA)
    if pixel is None:
        return
    rows = _int(ds, "Rows", "US")
    columns = _int(ds, "Columns", "US")
    bits = _int(ds, "BitsAllocated", "US")
    samples = _int(ds, "SamplesPerPixel", "US")
    frames = _int(ds, "NumberOfFrames", "IS", default=1)
    if transfer_syntax.is_encapsulated:
        if pixel.length is not None:
            raise DoesNotMatch("pixel data of a compressed transfer syntax is not encapsulated")
        if pixel.items < 2:  # the basic offset table, then at least one fragment
            raise DoesNotMatch("encapsulated pixel data holds no fragment")
        return
    if pixel.length is None:
        raise DoesNotMatch("pixel data of a native transfer syntax has an undefined length")
    if bits != 1 and (bits <= 0 or bits % 8):
        raise DoesNotMatch(f"BitsAllocated {bits} is neither 1 nor a multiple of 8")
    if frames < 1:
        raise DoesNotMatch(f"NumberOfFrames {frames} is less than 1")
    pixels = rows * columns * samples * frames
    expected = (pixels * bits + 7) // 8
    if samples == 3 and str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422":
        expected = expected // 3 * 2  # two chroma samples shared by each pair of pixels
    # An odd length is padded to even with one byte (PS3.5 8.1.1).
    if pixel.length != expected and not (expected % 2 and pixel.length == expected + 1):
        raise DoesNotMatch(f"pixel data is {pixel.length} bytes; Rows, Columns, SamplesPerPixel, "
                           f"BitsAllocated and NumberOfFrames say {expected}")


# Attributes the store row copies (scp.InstanceMeta); none decides where or whether the instance is kept.
METADATA_KEYWORDS = ("PatientID", "AccessionNumber", "StudyDescription", "Modality", "BodyPartExamined",
                     "SeriesDescription", "SliceThickness")


# Every attribute the receiver reads from a received data set's header (identity, check_pixel_data,
# drop_unreadable_metadata, node/receive/header.py instance_meta): part10.read_header, given what scan found,
# decodes only these. One read on the receive path that is not listed here finds the attribute missing.
HEADER_KEYWORDS = ("SpecificCharacterSet", *(keyword for keyword, _ in UID_KEYWORDS), "SamplesPerPixel",
                   "PhotometricInterpretation", "NumberOfFrames", "Rows", "Columns", "BitsAllocated",
                   *METADATA_KEYWORDS)


def drop_unreadable_metadata(ds: Dataset, keywords: tuple[str, ...] = METADATA_KEYWORDS) -> list[str]:
    """Remove from the decoded `ds` (not from the bytes kept) descriptive attributes that were sent with
    a VR other than their own, or that do not decode; return their keywords.

    Such an attribute does not make the instance unusable, so the instance is still stored; the row
    just lacks that value. Converting it anyway would have pydicom log the value ("Invalid value for
    VR IS: '<patient id>'"), and logs carry no patient data.
    """
    dropped = []
    for keyword in keywords:
        tag = tag_of(keyword)
        if raw_text(ds, tag) is not CONVERT:  # absent (None), or plain text that converts as it is
            continue
        try:
            ok = _encoded_vr(ds, keyword) in (None, _dictionary_vr(tag))
            if ok:
                ds[tag].value  # noqa: B018 - convert now, inside the try
        except Exception:  # noqa: BLE001 - pydicom's conversion errors vary by VR
            ok = False
        if not ok:
            del ds[tag]
            dropped.append(keyword)
    return dropped
