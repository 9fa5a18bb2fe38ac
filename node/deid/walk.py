"""Every data element of a dataset, nested sequence items included, with a readable path for errors."""

from __future__ import annotations

from typing import Iterator

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset


def tag_name(elem: DataElement) -> str:
    t = elem.tag
    return f"({t.group:04X},{t.element:04X}) {elem.keyword or ('private' if t.is_private else 'unknown')}"


def walk(ds: Dataset, path: str = "") -> Iterator[tuple[str, Dataset, DataElement]]:
    """(path, the dataset holding it, element) for every element, depth first; file_meta not included."""
    for tag in list(ds.keys()):
        elem = ds[tag]  # converts a raw element
        here = f"{path}{tag_name(elem)}"
        yield here, ds, elem
        if elem.VR == "SQ" and elem.value is not None:
            for i, item in enumerate(elem.value):
                yield from walk(item, f"{here}[{i}] > ")


def values(elem: DataElement) -> list[str]:
    """The element's values as strings (multi-valued ones split); bytes decoded as Latin-1."""
    v = elem.value
    if v is None or elem.VR == "SQ":
        return []
    if isinstance(v, (bytes, bytearray)):
        return [bytes(v).decode("latin-1")]
    if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
        return [str(x) for x in v]
    return [str(v)]
