"""The last line of defence: refuse a de-identified copy in which any original identity is still found.

The Basic Profile table keeps attributes it does not list, and some vendors put a patient ID into
one of those; this check finds such values at any depth (private and file meta included), also
inside longer strings, so a copy with identity in an unexpected place never leaves.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.deid.errors import DeidentificationError
from node.deid.walk import values, walk

PIXEL_TAGS = frozenset(Tag(t) for t in ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)))
DATE_VRS = ("DA", "DT", "TM")
NUMERIC_VRS = ("US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT", "DS", "IS")
BINARY_VRS = ("OB", "OW", "OF", "OD", "OL", "OV", "UN")
# Attributes whose original values must not survive, and how the error names them.
IDENTITY_KEYWORDS = {"PatientID": "patient ID", "OtherPatientIDs": "patient ID", "PatientName": "patient name",
                     "OtherPatientNames": "patient name", "PatientBirthName": "patient name",
                     "PatientMotherBirthName": "patient name", "PatientBirthDate": "birth date",
                     "AccessionNumber": "accession number"}


@dataclass(frozen=True)
class Forbidden:
    what: str  # "patient ID", "UID"... (the error names this, never the value)
    value: str
    skip_dates: bool = False  # not looked for in DA/DT/TM elements (a date option handles those)


def identity_values(src: Dataset, uids: set[str], *, dates_handled: bool) -> list[Forbidden]:
    """The original identifying values of `src` (at any depth), plus the instance UIDs replaced."""
    out: list[Forbidden] = []
    for _, _, elem in walk(src):
        what = IDENTITY_KEYWORDS.get(elem.keyword)
        if what is None or elem.tag.is_private:
            continue
        for v in (v.strip() for v in values(elem)):
            if v:
                out.append(Forbidden(what, v, what == "birth date" and dates_handled))
                if elem.VR == "PN":
                    out.extend(Forbidden(what, part) for part in _name_parts(v))
    out.extend(Forbidden("UID", uid) for uid in uids)
    return out


def check_no_leak(ds: Dataset, forbidden: list[Forbidden]) -> None:
    """Raise DeidentificationError naming the element if any forbidden value is found in `ds`.

    Values of 4 characters or more (2 non-ASCII, 16 for UIDs) are also looked for inside longer strings. Numbers
    (DS, IS, US...) and bulk binary data other than UN are not searched: identity does not hide there,
    and short numeric IDs would match them by chance.
    """
    elements = list(walk(ds.file_meta, "file meta > ")) if getattr(ds, "file_meta", None) is not None else []
    elements += list(walk(ds))
    for path, _, elem in elements:
        if elem.VR in NUMERIC_VRS or elem.tag in PIXEL_TAGS or (
                elem.VR in BINARY_VRS and (elem.VR != "UN" or len(elem.value or b"") > 65536)):
            continue
        found = values(elem)
        if not found:
            continue
        for f in forbidden:
            if f.skip_dates and elem.VR in DATE_VRS:
                continue
            sub = len(f.value) >= _min_substring(f)
            if any(v == f.value or (sub and f.value in v) for v in found):
                raise DeidentificationError(
                    f"the de-identified copy still holds an original {f.what} in {path}; the instance is not sent. "
                    f"PS3.15 Table E.1-1 keeps this attribute as configured: clear it at the source, or keep "
                    f"remove_private_tags on and the tag out of safe_private if it is private")


def _min_substring(f: Forbidden) -> int:
    """Shorter values are only matched whole: they would turn up inside unrelated strings.

    Two ideographic characters (a Chinese name) are distinctive enough; four Latin ones are needed."""
    if f.what == "UID":
        return 16
    return 4 if f.value.isascii() else 2


def _name_parts(name: str) -> list[str]:
    """Name components (all three PN groups) long enough to look for inside other strings."""
    parts = {p.strip() for group in name.split("=") for p in group.split("^")}
    return sorted(p for p in parts if p and p != name and len(p) >= (4 if p.isascii() else 2))
