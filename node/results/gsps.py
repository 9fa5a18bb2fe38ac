"""A Grayscale Softcopy Presentation State that draws the segments over the source CT, for viewers without SEG.

The viewer shows the original images with the presentation state's graphics on top: one POLYLINE per
outline per slice (one graphic layer and colour per segment), the segment's finding as text beside it,
and on every image of the series the 'not for diagnosis' banner with the result's findings.
"""

from __future__ import annotations

from typing import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from .contours import mask_contours
from .overlay import Overlay, copy_series_anatomy, dicom_text, slices_with, truncate

TEXT_LAYER = "AI TEXT"
SHORT_TEXT_MAX = 1024  # ST


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
    annotations = []
    for o in overlays:
        layer = layer_of[o.number]
        tracking = {"tracking_id": o.tracking[0], "tracking_uid": o.tracking[1]} if o.tracking else {}
        text = dicom_text(truncate(o.text, SHORT_TEXT_MAX), ref)
        for k in slices_with(o.mask):
            contours = mask_contours(o.mask[k])
            graphics = [hd.pr.GraphicObject(hd.pr.GraphicTypeValues.POLYLINE, c, hd.pr.AnnotationUnitsValues.PIXEL,
                                            **tracking) for c in contours]
            top = min(contours, key=lambda c: (c[:, 1].min(), c[:, 0].min()))
            anchor = tuple(float(v) for v in top[0])  # the outline's top-left corner
            label = hd.pr.TextObject(text, hd.pr.AnnotationUnitsValues.PIXEL, anchor_point=anchor,
                                     anchor_point_visible=False, **tracking)
            annotations.append(hd.pr.GraphicAnnotation([headers[k]], layer, graphic_objects=graphics,
                                                       text_objects=[label]))
    texts = [hd.pr.TextObject(dicom_text(banner[0], ref), hd.pr.AnnotationUnitsValues.DISPLAY,
                              bounding_box=(0.01, 0.01, 0.99, 0.05),
                              text_justification=hd.pr.TextJustificationValues.LEFT)]
    if len(banner) > 1:
        texts.append(hd.pr.TextObject(dicom_text(truncate("; ".join(banner[1:]), SHORT_TEXT_MAX), ref),
                                      hd.pr.AnnotationUnitsValues.DISPLAY, bounding_box=(0.01, 0.05, 0.99, 0.15),
                                      text_justification=hd.pr.TextJustificationValues.LEFT))
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
