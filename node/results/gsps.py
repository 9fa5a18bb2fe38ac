"""A Grayscale Softcopy Presentation State that draws the segments over the source CT, for viewers without SEG.

The viewer shows the original images with the presentation state's graphics on top: one POLYLINE per
outline per slice (one graphic layer and colour per segment), the segment's finding as text beside it,
and on every image of the series the 'not for diagnosis' banner with the result's findings.
"""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from .contours import mask_contours, simplify
from .overlay import Overlay, copy_series_anatomy, dicom_text, slices_with, truncate

TEXT_LAYER = "AI TEXT"
SHORT_TEXT_MAX = 1024  # ST


def outline(contour: np.ndarray) -> np.ndarray:
    """The drawn outline: off the exact pixel border by at most 1 pixel, and by at most ~5% of the
    region's size, so a lung needs several times fewer points and a 5-pixel nodule stays round."""
    x, y = contour[:, 0], contour[:, 1]
    area = abs(0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])))
    return simplify(contour, min(1.0, 0.05 * area ** 0.5))


class FastAnnotation(hd.pr.GraphicAnnotation):
    """A graphic annotation on single-frame images, built without highdicom's per-image IOD look-ups.

    hd.pr.GraphicAnnotation spends about 10 ms per referenced image finding out from the standard's tables
    whether its SOP class is an image and multi-frame: seconds for an organ outlined on hundreds of slices,
    and again for the banner on every slice. build_gsps makes the series' first annotation with highdicom,
    so those checks run once per series (its images share one SOP class); this builds the same attributes
    (tests/test_fallback.py compares the two) for the rest, whose outlines lie within the image by
    construction.
    """

    def __init__(self, referenced_images: Sequence[Dataset], graphic_layer: hd.pr.GraphicLayer, *,
                 graphic_objects: Sequence[hd.pr.GraphicObject] = (),
                 text_objects: Sequence[hd.pr.TextObject] = ()) -> None:
        Dataset.__init__(self)
        items = []
        for image in referenced_images:
            item = Dataset()
            item.ReferencedSOPClassUID = image.SOPClassUID
            item.ReferencedSOPInstanceUID = image.SOPInstanceUID
            items.append(item)
        self.ReferencedImageSequence = items
        self.GraphicLayer = graphic_layer.GraphicLayer
        if graphic_objects:
            self.GraphicObjectSequence = list(graphic_objects)
        if text_objects:
            self.TextObjectSequence = list(text_objects)


def _layer_name(o: Overlay) -> str:
    return f"AI SEGMENT {o.number}"  # a CS of at most 16 characters for up to 99999 segments


def build_gsps(headers: Sequence[Dataset], overlays: Sequence[Overlay], banner: Sequence[str], *,
               name: str, version: str, series_uid: str, sop_uid: str, instance_number: int,
               manufacturer: str, device_serial: str) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """The presentation state for one source series (`headers` in the masks' slice order).

    It references every image of the series, so the banner shows whichever slice the reader is on;
    `banner` is its lines (the first is the warning). `overlays` may be empty (findings without masks).
    """
    ref = headers[0]
    layer_of = {o.number: hd.pr.GraphicLayer(_layer_name(o), order=i, description=truncate(o.label, 64),
                                             display_color=hd.color.CIELabColor.from_rgb(*o.rgb))
                for i, o in enumerate(overlays, start=1)}
    text_layer = hd.pr.GraphicLayer(TEXT_LAYER, order=len(overlays) + 1, description="AI result banner")
    annotations: list[hd.pr.GraphicAnnotation] = []
    for o in overlays:
        layer = layer_of[o.number]
        tracking = {"tracking_id": o.tracking[0], "tracking_uid": o.tracking[1]} if o.tracking else {}
        text = dicom_text(truncate(o.text, SHORT_TEXT_MAX), ref)
        for k in slices_with(o.mask):
            contours = [outline(c) for c in mask_contours(o.mask[k])]
            graphics = [hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE, c, hd.pr.AnnotationUnitsValues.PIXEL,
                                            **tracking) for c in contours]
            anchor = tuple(float(v) for v in contours[0][0])  # the top-left corner of the topmost outline
            label = hd.pr.TextObject(text, hd.pr.AnnotationUnitsValues.PIXEL, anchor_point=anchor,
                                     anchor_point_visible=False, **tracking)
            make = FastAnnotation if annotations else hd.pr.GraphicAnnotation  # highdicom checks the first
            annotations.append(make([headers[k]], layer, graphic_objects=graphics, text_objects=[label]))
    texts = [hd.pr.TextObject(dicom_text(banner[0], ref), hd.pr.AnnotationUnitsValues.DISPLAY,
                              bounding_box=(0.01, 0.01, 0.99, 0.05),
                              text_justification=hd.pr.TextJustificationValues.LEFT)]
    if len(banner) > 1:
        texts.append(hd.pr.TextObject(dicom_text(truncate("; ".join(banner[1:]), SHORT_TEXT_MAX), ref),
                                      hd.pr.AnnotationUnitsValues.DISPLAY, bounding_box=(0.01, 0.05, 0.99, 0.15),
                                      text_justification=hd.pr.TextJustificationValues.LEFT))
    if annotations:
        annotations.append(FastAnnotation(headers, text_layer, text_objects=texts))
    else:
        annotations.append(hd.pr.GraphicAnnotation(list(headers), text_layer, text_objects=texts))
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=list(headers),
        series_instance_uid=series_uid,
        series_number=9003,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        manufacturer_model_name=name,
        software_versions=version,
        device_serial_number=device_serial,
        content_label="AI_OVERLAY",
        content_description=dicom_text(f"{name} {version}: AI result, not for diagnosis"[:64], ref),
        graphic_annotations=annotations,
        graphic_layers=[*layer_of.values(), text_layer],
        series_description=f"AI {name} {version} overlay"[:64],
    )
    copy_series_anatomy(pr, ref)
    return pr
