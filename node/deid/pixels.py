"""Burned-in annotation: identity in the pixels, which the node does not clean, so such images stay inside."""

from __future__ import annotations

from pydicom.dataset import Dataset

from node.deid.errors import BurnedInAnnotationError

# Kinds of image that often carry burned-in text: unless marked BurnedInAnnotation NO they are refused.
SUSPECT_MODALITIES = frozenset({"US", "OT", "XC", "ES", "SC", "GM", "SM", "DOC"})
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # prefix of the Secondary Capture SOP classes


def check_burned_in(ds: Dataset) -> None:
    """Raise BurnedInAnnotationError for an image whose pixels may show identity (Clean Pixel Data not done)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    sop = ds.get("SOPInstanceUID", "?")
    if flag == "YES":
        raise BurnedInAnnotationError(
            f"instance {sop}: (0028,0301) BurnedInAnnotation is YES and the node does not clean pixel data "
            f"(Clean Pixel Data Option); not sent: route only series without burned-in text to external destinations")
    modality = str(ds.get("Modality", "") or "").upper()
    if flag != "NO" and (modality in SUSPECT_MODALITIES or str(ds.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE)):
        raise BurnedInAnnotationError(
            f"instance {sop}: (0028,0301) BurnedInAnnotation is absent on a {modality or 'secondary capture'} image, "
            f"a kind that often has burned-in text; not sent: only such images marked BurnedInAnnotation NO "
            f"go to external destinations")
