"""What the viewer fallbacks (GSPS overlay, key images) draw: one outline per segment, labelled with its finding."""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset

from node.plugin_api import Finding

BANNER = "AI RESULT – NOT FOR DIAGNOSIS"

# Outline colours (RGB), chosen to stand out on a grey CT: yellow, cyan, magenta, green, orange, ...
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 255, 0), (0, 255, 255), (255, 0, 255), (0, 255, 0), (255, 128, 0), (128, 160, 255),
    (255, 96, 96), (160, 255, 160),
)


@dataclass(frozen=True)
class Overlay:
    """One segment as drawn: its mask over a source series, a colour and the text shown beside it."""

    number: int  # 1-based, in result order; picks the colour and the GSPS graphic layer
    series_uid: str
    label: str  # the segment label
    text: str  # the finding it belongs to, or the segment's type when no finding names it
    mask: np.ndarray  # bool (slices, rows, columns) over the series' slices in `sources` order
    rgb: tuple[int, int, int]
    tracking: tuple[str, str] | None = None  # the finding's (tracking id, tracking UID), as in the SR


def finding_text(f: Finding) -> str:
    """A short human label, e.g. 'Lung nodule (Right lung): Diameter 8.2 mm, confidence 0.91'."""
    text = f.finding_type.meaning
    if f.finding_site is not None:
        text += f" ({f.finding_site.meaning})"
    values = [f"{m.concept.meaning} {m.value:.4g} {m.unit.value}" for m in f.measurements]
    if f.confidence is not None:
        values.append(f"confidence {f.confidence:.2f}")
    return f"{text}: {', '.join(values)}" if values else text


def algorithm_line(name: str, version: str, model_name: str | None, model_version: str | None) -> str:
    line = f"{name} {version}"
    if model_name:
        line += f", model {model_name} {model_version or ''}".rstrip()
    return line


def dicom_text(text: str, like: Dataset) -> str:
    """`text` as a value for a dataset with the character set of `like`.

    The result objects keep the source's Specific Character Set (patient names must stay as they
    are), and ISO-IR 6/100 cannot hold the dash in BANNER, so characters the set cannot encode are
    replaced by ASCII ones rather than sent as mojibake.
    """
    charsets = like.get("SpecificCharacterSet") or ["ISO_IR 6"]
    if isinstance(charsets, str):
        charsets = [charsets]
    try:
        encodings = convert_encodings(list(charsets))
    except LookupError:
        encodings = ["ascii"]
    try:
        text.encode(encodings[0])  # with ISO 2022 code extensions: the default set only, to stay simple
        return text
    except (UnicodeEncodeError, LookupError):
        pass
    ascii_text = text.replace("–", "-").replace("—", "-").replace("µ", "u")
    return ascii_text.encode("ascii", "replace").decode("ascii")


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def slices_with(mask: np.ndarray) -> np.ndarray:
    """Indices of the slices where the (slices, rows, columns) mask has any pixel."""
    return np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))


def key_slices(mask: np.ndarray, count: int) -> list[int]:
    """Up to `count` slices with the largest cross-section, spread apart so they are not near-copies."""
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    present = np.flatnonzero(areas)
    if count < 1 or present.size == 0:
        return []
    gap = max(1, int(present[-1] - present[0] + 1) // (2 * count))
    chosen: list[int] = []
    for k in np.argsort(-areas, kind="stable"):
        if areas[k] == 0 or len(chosen) == count:
            break
        if all(abs(int(k) - c) >= gap for c in chosen):
            chosen.append(int(k))
    return chosen


def copy_series_anatomy(target: Dataset, source: Dataset) -> None:
    """Body Part Examined and Laterality (General Series) from the source image.

    Laterality is Type 2C, required for a paired body part; dciodvfy treats an unknown body part as
    possibly paired, so with neither in the source it is sent empty (unknown) rather than left out.
    """
    if source.get("BodyPartExamined"):
        target.BodyPartExamined = source.BodyPartExamined
    lat = source.get("Laterality") or source.get("ImageLaterality")
    if lat in ("R", "L"):
        target.Laterality = lat
    elif not source.get("BodyPartExamined"):
        target.Laterality = ""
