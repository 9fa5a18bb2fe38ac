"""Viewer fallbacks for PACS without SEG: a GSPS overlay and burned-in key images, built from ct_lung's real
result on a synthetic CT, valid per dciodvfy, in the source study, deterministic, and accepted by Orthanc."""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
import pytest
from scipy import ndimage

from node.plugin_api import Code, Finding, PluginResult, StudyInput
from node.results import AlgorithmInfo, build_results, validate_with_dciodvfy
from node.results.contours import edge_pixels, mask_contours
from node.results.fallback import build_fallbacks
from node.results.gsps import FastAnnotation
from node.results.keyimage import BANNER_RGB
from node.run.series_loader import load_series
from node.synth import write_chest_ct
from plugins.ct_lung import CtLungPlugin

GSPS_STORAGE = "1.2.840.10008.5.1.4.1.1.11.1"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
ALGO = AlgorithmInfo("ct_lung", "1.0.0", model_name="lungseg", model_version="2")
PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
                 "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDescription")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A small synthetic chest CT, ct_lung's result on it, and its fallbacks saved as Part-10 files."""
    tmp = tmp_path_factory.mktemp("fallback")
    ct = write_chest_ct(tmp / "ct", slices=20, slice_thickness=6.0, rows=128, cols=128, pixel_spacing=2.8)
    vol, headers = load_series(ct.files)
    result = CtLungPlugin().run(StudyInput(ct.study_uid, [vol], tmp))
    objs = build_fallbacks(result, {vol.series_uid: headers}, ALGO, {"GSPS", "SC"},
                           volumes={vol.series_uid: vol}, max_key_images=2)
    paths = []
    for i, o in enumerate(objs):
        p = tmp / f"{i:02d}-{o.kind}.dcm"
        o.dataset.save_as(p, enforce_file_format=True)
        paths.append(p)
    return ct, vol, headers, result, objs, paths


def of_kind(objs, kind):
    return [o.dataset for o in objs if o.kind == kind]


def expected_outlines(mask2d):
    """Regions (4-connected) plus holes in them (8-connected background not reaching the border)."""
    regions = ndimage.label(mask2d)[1]
    background, n = ndimage.label(~np.pad(mask2d, 1), structure=np.ones((3, 3)))
    return regions + n - 1


def polygon_area(points):
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))  # + clockwise on screen (rows point down)


def test_contours_follow_pixel_borders_regions_holes_and_corner_touches():
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[3, 3] = False
    outer, hole = mask_contours(ring)
    assert polygon_area(outer) == 25 and polygon_area(hole) == -1
    assert outer[0].tolist() == [1, 1] and outer[-1].tolist() == [1, 1] and len(outer) == 5
    diagonal = np.zeros((4, 4), bool)
    diagonal[1, 1] = diagonal[2, 2] = True  # touching at a corner only: two regions
    assert [polygon_area(c) for c in mask_contours(diagonal)] == [1, 1]
    rng = np.random.default_rng(3)
    for _ in range(20):
        m = rng.random((24, 24)) < 0.45
        outlines = mask_contours(m)
        assert len(outlines) == expected_outlines(m)
        assert sum(polygon_area(c) for c in outlines) == m.sum()
    assert mask_contours(np.zeros((5, 5), bool)) == []


def test_fast_annotation_is_highdicoms(case):
    headers = case[2]
    obj = hd.pr.GraphicObject("POLYLINE", np.array([[1.0, 1.0], [5.0, 1.0], [5.0, 5.0], [1.0, 1.0]]), "PIXEL")
    text = hd.pr.TextObject("label", "PIXEL", anchor_point=(1.0, 1.0), anchor_point_visible=False)
    layer = hd.pr.GraphicLayer("AI TEXT", order=1)
    for images in ([headers[3]], headers[:5]):
        fast = FastAnnotation(images, layer, graphic_objects=[obj], text_objects=[text])
        assert fast == hd.pr.GraphicAnnotation(images, layer, graphic_objects=[obj], text_objects=[text])
    assert FastAnnotation(headers[:2], layer, text_objects=[text]) == hd.pr.GraphicAnnotation(
        headers[:2], layer, text_objects=[text])


def test_all_pass_dciodvfy(case):
    *_, objs, paths = case
    assert [o.kind for o in objs] == ["GSPS"] + ["SC"] * (len(objs) - 1) and len(objs) >= 2
    for o, p in zip(objs, paths):
        assert validate_with_dciodvfy(p) == [], o.kind


def test_in_the_source_study_with_its_patient_one_series_per_kind(case):
    ct, vol, headers, _, objs, _ = case
    src = headers[0]
    for ds in (o.dataset for o in objs):
        for kw in PATIENT_STUDY:
            assert ds.get(kw) == src.get(kw), kw
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    [gsps] = of_kind(objs, "GSPS")
    scs = of_kind(objs, "SC")
    assert gsps.SOPClassUID == GSPS_STORAGE and gsps.Modality == "PR"
    assert {ds.SOPClassUID for ds in scs} == {SC_STORAGE}
    assert len({ds.SeriesInstanceUID for ds in scs}) == 1 and scs[0].SeriesInstanceUID != gsps.SeriesInstanceUID
    assert [int(ds.InstanceNumber) for ds in scs] == list(range(1, len(scs) + 1))
    assert len({ds.SOPInstanceUID for ds in scs}) == len(scs)


def test_gsps_draws_each_outline_on_its_slice(case):
    _, vol, headers, result, objs, _ = case
    [gsps] = of_kind(objs, "GSPS")
    refs = [i.ReferencedSOPInstanceUID for s in gsps.ReferencedSeriesSequence for i in s.ReferencedImageSequence]
    assert gsps.ReferencedSeriesSequence[0].SeriesInstanceUID == vol.series_uid
    assert sorted(refs) == sorted(vol.sop_instance_uids)
    slice_of = {uid: k for k, uid in enumerate(vol.sop_instance_uids)}
    segments = result.segmentations[0].segments
    layers = {layer.GraphicLayer: layer for layer in gsps.GraphicLayerSequence}
    assert {"AI SEGMENT 1", "AI SEGMENT 2", "AI TEXT"} <= set(layers)
    assert layers["AI SEGMENT 1"].GraphicLayerDescription == "left_lung"
    drawn: dict[tuple[int, int], list] = {}
    banner = None
    for ann in gsps.GraphicAnnotationSequence:
        if ann.GraphicLayer == "AI TEXT":
            banner = ann
            continue
        [ref] = ann.ReferencedImageSequence
        n = int(ann.GraphicLayer.rsplit(" ", 1)[1])
        assert (n, slice_of[ref.ReferencedSOPInstanceUID]) not in drawn
        drawn[(n, slice_of[ref.ReferencedSOPInstanceUID])] = list(ann.GraphicObjectSequence)
        [label] = ann.TextObjectSequence
        assert f"({segments[n - 1].type.meaning})" in label.UnformattedTextValue
    assert drawn
    for n, seg in enumerate(segments, start=1):
        on = {k for k in range(seg.mask.shape[0]) if seg.mask[k].any()}
        assert {k for m, k in drawn if m == n} == on, seg.label
        for k in on:
            objects = drawn[(n, k)]
            exact = mask_contours(seg.mask[k])
            assert len(objects) == len(exact) == expected_outlines(seg.mask[k])
            assert {o.GraphicType for o in objects} == {"POLYLINE"}
            assert {o.GraphicAnnotationUnits for o in objects} == {"PIXEL"}
            for o, e in zip(objects, exact):
                p = np.asarray(o.GraphicData, float).reshape(-1, 2)
                assert (p[0] == p[-1]).all() and len(p) >= 4  # closed
                corners = {tuple(v) for v in e}
                assert all(tuple(v) in corners for v in p)  # simplified: some of the pixel-border corners
                perimeter = np.abs(np.diff(e, axis=0)).sum()
                assert abs(polygon_area(p) - polygon_area(e)) <= perimeter  # within a pixel of the border
    # The banner is on every image of the series, with the finding labels.
    assert len(banner.ReferencedImageSequence) == len(headers)
    texts = [t.UnformattedTextValue for t in banner.TextObjectSequence]
    assert texts[0] == "AI RESULT - NOT FOR DIAGNOSIS"  # ISO_IR 100 source: the en dash becomes a hyphen
    for f in result.findings:
        assert f.finding_type.meaning in texts[1] and f.finding_site.meaning in texts[1]
    assert "ct_lung 1.0.0" in texts[1] and "lungseg 2" in texts[1]


def test_gsps_outlines_carry_the_srs_tracking_uids(case):
    _, vol, headers, result, objs, _ = case
    [gsps] = of_kind(objs, "GSPS")
    sr = build_results(result, {vol.series_uid: headers}, ALGO)[-1].dataset

    def items(ds):
        for item in ds.get("ContentSequence", []):
            yield item
            yield from items(item)

    sr_uids = {i.UID for i in items(sr) if i.ValueType == "UIDREF"}
    tracked = {(o.TrackingID, o.TrackingUID) for a in gsps.GraphicAnnotationSequence
               for o in a.get("GraphicObjectSequence", [])}
    assert {t for t, _ in tracked} == {"left-lung", "right-lung"}
    assert {u for _, u in tracked} <= sr_uids


def test_key_images_show_outlines_at_the_mask_edges_and_a_banner(case):
    _, vol, headers, result, objs, _ = case
    segments = result.segmentations[0].segments
    slice_of = {uid: k for k, uid in enumerate(vol.sop_instance_uids)}
    shown = set()
    for ds in of_kind(objs, "SC"):
        assert ds.BurnedInAnnotation == "YES"
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated) == (3, "RGB", 8)
        k = slice_of[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        shown.add(k)
        px = ds.pixel_array
        band = int(ds.Rows) - int(headers[k].Rows)
        assert band > 0 and px.shape == (ds.Rows, ds.Columns, 3) and int(ds.Columns) == int(headers[k].Columns)
        image = px[band:]
        colours = {}
        for seg in segments:
            if not seg.mask[k].any():
                continue
            edge = edge_pixels(seg.mask[k], 1)
            colour = image[edge][0]
            assert (image[edge] == colour).all(), seg.label  # the whole mask edge in the segment's colour
            assert not (colour[0] == colour[1] == colour[2])  # a colour, not grey
            colours[seg.label] = tuple(colour)
        assert len(set(colours.values())) == len(colours)  # one colour per segment
        outline = np.zeros(image.shape[:2], bool)
        for seg in segments:
            outline |= edge_pixels(seg.mask[k], 2)
        rest = image[~outline]
        assert (rest[:, 0] == rest[:, 1]).all() and (rest[:, 1] == rest[:, 2]).all()  # elsewhere the grey CT
        assert len(np.unique(rest[:, 0])) > 3  # windowed, not flat
        first_line = px[:band // 3]
        assert (first_line == BANNER_RGB).all(axis=-1).sum() > 20  # the warning, burned in
        assert "NOT FOR DIAGNOSIS" in ds.ImageComments and "Lung (Lung): Volume" in ds.ImageComments
    # Each lung's largest cross-section is among the key images.
    for seg in segments:
        areas = seg.mask.reshape(seg.mask.shape[0], -1).sum(axis=1)
        assert int(np.argmax(areas)) in shown


def test_uids_are_stable_and_change_with_the_plugin_version(case):
    _, vol, headers, result, objs, _ = case
    again = build_fallbacks(result, {vol.series_uid: headers}, ALGO, ["SC", "GSPS"],
                            volumes={vol.series_uid: vol.pixels}, max_key_images=2)
    key = [(o.kind, o.sop_instance_uid, o.series_instance_uid) for o in objs]
    assert [(o.kind, o.sop_instance_uid, o.series_instance_uid) for o in again] == key
    newer = build_fallbacks(result, {vol.series_uid: headers}, AlgorithmInfo("ct_lung", "1.0.1"), {"GSPS"})
    assert newer[0].sop_instance_uid != key[0][1] and newer[0].series_instance_uid != key[0][2]


def test_kinds_inputs_and_findings_without_masks(case, tmp_path):
    ct, vol, headers, result, objs, _ = case
    sources = {vol.series_uid: headers}
    with pytest.raises(ValueError, match="unknown fallback kind"):
        build_fallbacks(result, sources, ALGO, {"SEG"})
    with pytest.raises(ValueError, match="volumes="):  # the node's headers carry no pixel data
        build_fallbacks(result, sources, ALGO, {"SC"})
    assert build_fallbacks(PluginResult(), sources, ALGO, {"GSPS", "SC"}) == []
    assert [o.kind for o in build_fallbacks(result, sources, ALGO, "GSPS")] == ["GSPS"]
    # A classifier's finding without a mask: the text on every image, one key image; UTF-8 keeps the dash.
    utf8 = [copy.deepcopy(h) for h in headers]  # a shallow copy shares its elements with the module's headers
    for h in utf8:
        h.SpecificCharacterSet = "ISO_IR 192"
    finding = Finding("f1", Code("233604007", "SCT", "Pneumonia"), confidence=0.87)
    built = build_fallbacks(PluginResult(findings=[finding]), {vol.series_uid: utf8}, ALGO, {"GSPS", "SC"},
                            volumes={vol.series_uid: vol})
    assert [o.kind for o in built] == ["GSPS", "SC"]
    gsps, sc = built[0].dataset, built[1].dataset
    [ann] = gsps.GraphicAnnotationSequence
    assert len(ann.ReferencedImageSequence) == len(headers)
    assert ann.TextObjectSequence[0].UnformattedTextValue == "AI RESULT – NOT FOR DIAGNOSIS"
    assert "Pneumonia: confidence 0.87" in ann.TextObjectSequence[1].UnformattedTextValue
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == vol.sop_instance_uids[len(headers) // 2]
    assert "Pneumonia: confidence 0.87" in sc.ImageComments and int(sc.Rows) > int(headers[0].Rows)
    for o in built:
        p = tmp_path / f"{o.kind}.dcm"
        o.dataset.save_as(p, enforce_file_format=True)
        assert validate_with_dciodvfy(p) == [], o.kind


def test_orthanc_files_them_into_the_source_study(case, orthanc):
    ct, vol, headers, result, objs, paths = case
    orthanc.upload_files(ct.files)
    orthanc.upload_files(paths)
    study = orthanc.find_study(ct.study_uid)
    assert study is not None
    series = {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in orthanc.series_of_study(study)}
    modalities = sorted(s["MainDicomTags"].get("Modality") for s in series.values())
    assert modalities == ["CT", "OT", "PR"]
    for o in objs:
        stored = series[o.series_instance_uid]
        uids = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances_of_series(stored["ID"])}
        assert o.sop_instance_uid in uids
    assert len(orthanc.client.get_json("patients")) == 1  # the same patient, not a new one


def test_segments_given_as_boxes_make_the_same_fallbacks(case):
    """Segment.offset (a box, as ct_nodule gives its nodules): the GSPS and key images are those of the
    whole-series masks."""
    import dataclasses

    ct, vol, headers, result, _, _ = case
    objs = build_fallbacks(result, {vol.series_uid: headers}, ALGO, {"GSPS", "SC"},
                           volumes={vol.series_uid: vol}, max_key_images=2)
    seg = result.segmentations[0]
    boxed = []
    for s in seg.segments:
        k, r, c = (np.flatnonzero(s.mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
        box = (slice(k[0], k[-1] + 1), slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1))
        boxed.append(dataclasses.replace(s, mask=s.mask[box].copy(), offset=(int(k[0]), int(r[0]), int(c[0]))))
    assert all(b.mask.size < s.mask.size for b, s in zip(boxed, seg.segments))
    again = dataclasses.replace(result, segmentations=[dataclasses.replace(seg, segments=boxed)])
    other = build_fallbacks(again, {vol.series_uid: headers}, ALGO, {"GSPS", "SC"},
                            volumes={vol.series_uid: vol}, max_key_images=2)
    assert [o.kind for o in other] == [o.kind for o in objs]
    for a, b in zip(objs, other):
        if a.kind == "SC":
            assert a.dataset.PixelData == b.dataset.PixelData
        else:
            assert a.dataset.GraphicAnnotationSequence == b.dataset.GraphicAnnotationSequence
