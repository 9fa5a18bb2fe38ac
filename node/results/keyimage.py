"""Secondary-capture key images: a windowed source slice with the segment outlines and the warning burned in.

For PACS and viewers that show neither SEG nor presentation states, only pixels. The image is the
source slice in 8-bit RGB with a text band added above it (so no anatomy is covered) that says
'AI RESULT – NOT FOR DIAGNOSIS', the algorithm and the findings on that slice, each in its outline's colour.
"""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from .contours import edge_pixels
from .overlay import Overlay, copy_series_anatomy, dicom_text, truncate

LUNG_WINDOW = (-600.0, 1500.0)  # (center, width) in HU
SOFT_TISSUE_WINDOW = (40.0, 400.0)
BANNER_RGB = (255, 80, 80)
TEXT_RGB = (255, 255, 255)


def window_for(header: Dataset, pixels: np.ndarray, looks_like_lung: bool) -> tuple[float, float]:
    """The slice's own (first) window; else for CT a lung or soft-tissue window, for other modalities
    the 1st to 99th percentile of the slice (their values have no fixed meaning)."""
    c, w = header.get("WindowCenter"), header.get("WindowWidth")
    if c is not None and w is not None:
        c = c[0] if isinstance(c, (MultiValue, list, tuple)) else c
        w = w[0] if isinstance(w, (MultiValue, list, tuple)) else w
        if float(w) > 0:
            return float(c), float(w)
    if header.get("Modality") == "CT":
        return LUNG_WINDOW if looks_like_lung else SOFT_TISSUE_WINDOW
    lo, hi = (float(v) for v in np.percentile(pixels, [1, 99]))
    return (lo + hi) / 2, max(hi - lo, 1.0)


def to_gray8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    lo = center - width / 2.0
    return np.clip(np.rint((values - lo) * (255.0 / width)), 0, 255).astype(np.uint8)


def _font(size: int):
    """Pillow's bundled font, so no font files are needed (a fixed bitmap font before Pillow 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _drawable(text: str) -> str:
    """Text the bundled font can draw: it has Latin-1 glyphs but no dashes beyond the hyphen."""
    text = text.replace("–", "-").replace("—", "-")
    return text.encode("latin-1", "replace").decode("latin-1")


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels (a word longer than a line is left to overflow)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def render(gray: np.ndarray, overlays: Sequence[tuple[np.ndarray, tuple[int, int, int], str]],
           banner: Sequence[str], *, line_width: int = 2) -> tuple[np.ndarray, int]:
    """(RGB image, height of the text band on top). `overlays`: (2-D mask, colour, text) per segment."""
    rows, cols = gray.shape
    size = max(10, round(cols / 40))
    font = _font(size)
    texts = [(t, BANNER_RGB if i == 0 else TEXT_RGB) for i, t in enumerate(banner)]
    texts += [(t, rgb) for _, rgb, t in overlays]
    lines = [(line, rgb) for text, rgb in texts for line in _wrap(_drawable(text), font, cols - 4)]
    step = size + 3
    band = len(lines) * step + 4
    out = np.zeros((band + rows, cols, 3), np.uint8)
    out[band:] = gray[..., None]
    for mask, rgb, _ in overlays:
        out[band:][edge_pixels(mask, line_width)] = rgb
    img = Image.fromarray(out, "RGB")
    draw = ImageDraw.Draw(img)
    draw.fontmode = "1"  # no anti-aliasing: the text keeps its exact colour
    for i, (text, rgb) in enumerate(lines):
        draw.text((2, 2 + i * step), text, fill=rgb, font=font)
    return np.asarray(img), band


def patient_orientation(header: Dataset) -> tuple[str, str]:
    """Patient Orientation (row and column directions) from the slice's Image Orientation (Patient)."""
    iop = [float(v) for v in header.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0])]

    def letter(v: Sequence[float]) -> str:
        i = int(np.argmax(np.abs(v)))
        return ("L", "P", "H")[i] if v[i] > 0 else ("R", "A", "F")[i]

    return letter(iop[:3]), letter(iop[3:])


def build_key_image(header: Dataset, hu: np.ndarray, overlays: Sequence[Overlay], slice_index: int,
                    banner: Sequence[str], *, name: str, version: str, series_uid: str, sop_uid: str,
                    instance_number: int, manufacturer: str, device_serial: str,
                    looks_like_lung: bool) -> hd.sc.SCImage:
    """The key image of one source slice (`hu`: its pixels in modality units, `header`: its dataset)."""
    hu = np.asarray(hu, np.float32)
    center, width = window_for(header, hu, looks_like_lung)
    gray = to_gray8(hu, center, width)
    if header.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = 255 - gray  # low values shown white, as the source is meant to be seen
    drawn = [(o.mask[slice_index], o.rgb, o.text) for o in overlays if o.mask[slice_index].any()]
    rgb, band = render(gray, drawn, banner)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=9004,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        patient_orientation=patient_orientation(header),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"AI {name} {version} key images"[:64],
        manufacturer_model_name=name,
        software_versions=version,
        device_serial_number=device_serial,
    )
    sc.copy_patient_and_study_information(header)
    copy_series_anatomy(sc, header)
    sc.ConversionType = "WSD"  # rendered by a workstation (this node), not digitised
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = dicom_text(truncate("; ".join([*banner, *(t for _, _, t in drawn)]), 10240), header)
    sc.DerivationDescription = dicom_text(truncate(
        f"{name} {version}: outlines of {len(drawn)} segment(s) burned into slice {slice_index + 1}, "
        f"window {center:g}/{width:g}, {band}-row text band on top", 1024), header)
    src = Dataset()
    src.ReferencedSOPClassUID = header.SOPClassUID
    src.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [src]
    return sc
