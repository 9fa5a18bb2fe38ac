"""SEG and TID 1500 SR built with highdicom: coded, in the source study, deterministic, valid per dciodvfy."""

import copy

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from node.plugin_api import Code, Finding, Measurement, PluginResult, Segment, Segmentation
from node.results import AlgorithmInfo, build_results, validate_with_dciodvfy

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
ANAT = Code("91723000", "SCT", "Anatomical Structure")
LEFT, RIGHT, LUNG = Code("44029006", "SCT", "Left lung"), Code("3341006", "SCT", "Right lung"), Code("39607008", "SCT", "Lung")
VOLUME, ML = Code("118565006", "SCT", "Volume"), Code("mL", "UCUM", "milliliter")


def small_ct(n=20, size=64):
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Patient", "PID42", "19700101", "F"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC1", "1"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.BodyPartExamined, ds.SeriesNumber, ds.InstanceNumber = "CT", "CHEST", 1, k + 1
        ds.Manufacturer = "TEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-32.0, -32.0, float(-k * 2.5)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.5
        ds.PositionReferenceIndicator = ""
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.PixelData = np.zeros((size, size), np.int16).tobytes()
        out.append(ds)
    return out


def result_for(sources, with_confidence=True):
    n, size = len(sources), sources[0].Rows
    left, right = np.zeros((n, size, size), bool), np.zeros((n, size, size), bool)
    left[3:15, 10:50, 35:55] = True
    right[3:15, 10:50, 8:28] = True
    series = sources[0].SeriesInstanceUID
    return PluginResult(
        findings=[
            Finding("left-lung", LUNG, [Measurement(VOLUME, 12.3, ML)], finding_site=LEFT, segment_label="left_lung",
                    confidence=0.93 if with_confidence else None),
            Finding("right-lung", LUNG, [Measurement(VOLUME, 11.1, ML)], finding_site=RIGHT, segment_label="right_lung"),
            Finding("total-lung", LUNG, [Measurement(VOLUME, 23.4, ML)], finding_site=LUNG),
        ],
        segmentations=[Segmentation(series, [Segment("left_lung", left, ANAT, LEFT),
                                             Segment("right_lung", right, ANAT, RIGHT)])],
        summary="test",
    )


def headers_only(sources):
    out = []
    for ds in sources:
        h = copy.deepcopy(ds)
        del h.PixelData  # the node passes headers without pixel data
        out.append(h)
    return out


@pytest.fixture
def built():
    src = small_ct()
    objs = build_results(result_for(src), {src[0].SeriesInstanceUID: headers_only(src)},
                         AlgorithmInfo("ct_lung", "1.0.0"))
    return src, objs


def content_items(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def test_seg(built):
    src, objs = built
    seg = next(o for o in objs if o.kind == "SEG").dataset
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["left_lung", "right_lung"]
    types = [s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in seg.SegmentSequence]
    assert types == ["44029006", "3341006"]
    assert seg.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src[0].SeriesInstanceUID
    assert seg.StudyInstanceUID == src[0].StudyInstanceUID and seg.PatientID == "PID42"


def test_sr_is_tid1500_with_volumes_algorithm_and_seg_reference(built):
    src, objs = built
    seg = next(o for o in objs if o.kind == "SEG")
    sr = next(o for o in objs if o.kind == "SR").dataset
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurement Report"
    assert sr.StudyInstanceUID == src[0].StudyInstanceUID and sr.PatientID == "PID42"
    items = list(content_items(sr))
    groups = [i for i in items if i.ConceptNameCodeSequence[0].CodeMeaning == "Measurement Group"]
    assert len(groups) == 3
    volumes = [i for i in items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeMeaning == "Volume"]
    assert sorted(float(v.MeasuredValueSequence[0].NumericValue) for v in volumes) == [11.1, 12.3, 23.4]
    assert {v.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue for v in volumes} == {"mL"}
    texts = {i.TextValue for i in items if i.ValueType == "TEXT"}
    assert "ct_lung" in texts and "1.0.0" in texts
    certainty = [i for i in items if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "111012"]
    assert [float(c.MeasuredValueSequence[0].NumericValue) for c in certainty] == [93.0]
    assert certainty[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"
    refs = [i.ReferencedSOPSequence[0] for i in items if i.ValueType == "IMAGE" and "ReferencedSOPSequence" in i]
    seg_refs = [r for r in refs if r.ReferencedSOPInstanceUID == seg.sop_instance_uid]
    assert {int(r.ReferencedSegmentNumber) for r in seg_refs} == {1, 2}
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert seg.sop_instance_uid in evidence and src[0].SOPInstanceUID in evidence


def test_uids_are_deterministic_per_plugin_version():
    src = small_ct()
    sources = {src[0].SeriesInstanceUID: headers_only(src)}
    a = build_results(result_for(src), sources, AlgorithmInfo("ct_lung", "1.0.0"))
    b = build_results(result_for(src, with_confidence=False), sources, AlgorithmInfo("ct_lung", "1.0.0"))
    c = build_results(result_for(src), sources, AlgorithmInfo("ct_lung", "1.0.1"))
    assert [(o.sop_instance_uid, o.series_instance_uid) for o in a] == \
           [(o.sop_instance_uid, o.series_instance_uid) for o in b]
    assert not {o.sop_instance_uid for o in a} & {o.sop_instance_uid for o in c}


def test_both_pass_dciodvfy(built, tmp_path):
    _, objs = built
    for o in objs:
        path = tmp_path / f"{o.kind}.dcm"
        o.dataset.save_as(path, enforce_file_format=True)
        assert validate_with_dciodvfy(path) == [], o.kind


def test_unknown_segment_label_is_a_clear_error():
    src = small_ct()
    res = result_for(src)
    bad = PluginResult(findings=[Finding("x", LUNG, [Measurement(VOLUME, 1.0, ML)], segment_label="nope")],
                       segmentations=res.segmentations)
    with pytest.raises(ValueError, match="segment 'nope'"):
        build_results(bad, {src[0].SeriesInstanceUID: headers_only(src)}, AlgorithmInfo("p", "1"))


def test_model_identity_is_recorded_in_seg_and_sr():
    src = small_ct()
    objs = build_results(result_for(src), {src[0].SeriesInstanceUID: headers_only(src)},
                         AlgorithmInfo("ct_lung", "1.0.0", model_name="unet", model_version="7",
                                       weights_sha256="ab" * 32))
    seg = next(o for o in objs if o.kind == "SEG").dataset
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "ct_lung" and algo.AlgorithmVersion == "1.0.0"
    assert "weights_sha256=" + "ab" * 32 in algo.AlgorithmParameters
    sr = next(o for o in objs if o.kind == "SR").dataset
    texts = {i.TextValue for i in content_items(sr) if i.ValueType == "TEXT"}
    assert "model_name=unet" in texts and "model_version=7" in texts


def test_overlapping_segments_stay_binary_and_valid(tmp_path):
    src = small_ct()
    n, size = len(src), src[0].Rows
    a, b = np.zeros((n, size, size), bool), np.zeros((n, size, size), bool)
    a[2:10, 10:40, 10:40] = True
    b[5:12, 30:50, 30:50] = True  # overlaps a
    res = PluginResult(segmentations=[Segmentation(src[0].SeriesInstanceUID,
                                                   [Segment("a", a, ANAT, LEFT), Segment("b", b, ANAT, RIGHT)])])
    (seg,) = build_results(res, {src[0].SeriesInstanceUID: headers_only(src)}, AlgorithmInfo("p", "1"))
    assert seg.kind == "SEG" and seg.dataset.SegmentsOverlap == "YES"
    assert int(seg.dataset.NumberOfFrames) == 8 + 7  # empty frames omitted
    path = tmp_path / "seg.dcm"
    seg.dataset.save_as(path, enforce_file_format=True)
    assert validate_with_dciodvfy(path) == []


def test_mask_shape_mismatch_is_a_clear_error():
    src = small_ct()
    res = PluginResult(segmentations=[Segmentation(src[0].SeriesInstanceUID, [
        Segment("a", np.ones((len(src) - 1, 64, 64), bool), ANAT, LEFT)])])
    with pytest.raises(ValueError, match="mask has shape"):
        build_results(res, {src[0].SeriesInstanceUID: headers_only(src)}, AlgorithmInfo("p", "1"))


def test_seg_frames_follow_source_order_and_skip_empty_slices(built):
    src, objs = built
    seg = next(o for o in objs if o.kind == "SEG").dataset
    index = {ds.SOPInstanceUID: k for k, ds in enumerate(src)}
    frames = [(int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
               index[f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID],
               [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient])
              for f in seg.PerFrameFunctionalGroupsSequence]
    assert int(seg.NumberOfFrames) == len(frames) == 2 * 12  # masks cover slices 3..14 only
    for segment, k, position in frames:
        assert 3 <= k < 15 and position == [float(v) for v in src[k].ImagePositionPatient]
    assert {se.SeriesInstanceUID for se in seg.ReferencedSeriesSequence} == {src[0].SeriesInstanceUID}
    # The instances its frames derive from (node/results/seg.py covered_part), not every slice of the series.
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
           {src[k].SOPInstanceUID for k in range(3, 15)}


def test_seg_of_a_few_scattered_slices_has_their_frames_and_references_only(tmp_path):
    """Small findings far apart (nodules): only their slices go to highdicom (covered_part picks them), and
    the SEG is what the whole series would give: each frame at its slice's position, with its pixels."""
    src = small_ct()
    n, size = len(src), src[0].Rows
    a, b = np.zeros((n, size, size), bool), np.zeros((n, size, size), bool)
    a[2:4, 10:20, 10:20] = True
    b[17, 40:50, 40:50] = True
    res = PluginResult(segmentations=[Segmentation(src[0].SeriesInstanceUID,
                                                   [Segment("a", a, ANAT, LEFT), Segment("b", b, ANAT, RIGHT)])])
    (built,) = build_results(res, {src[0].SeriesInstanceUID: headers_only(src)}, AlgorithmInfo("p", "1"))
    path = tmp_path / "seg.dcm"
    built.dataset.save_as(path, enforce_file_format=True)
    assert validate_with_dciodvfy(path) == []
    seg = pydicom.dcmread(path)
    index = {ds.SOPInstanceUID: k for k, ds in enumerate(src)}
    masks = {1: a, 2: b}
    frames = seg.pixel_array
    seen = []
    for f, pixels in zip(seg.PerFrameFunctionalGroupsSequence, frames):
        segment = int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        k = index[f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] == \
               [float(v) for v in src[k].ImagePositionPatient]
        assert np.array_equal(pixels.astype(bool), masks[segment][k])
        seen.append((segment, k))
    assert sorted(seen) == [(1, 2), (1, 3), (2, 17)]
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
           {src[k].SOPInstanceUID for k in (2, 3, 17)}


@pytest.mark.parametrize("spread", [True, False])
def test_a_segment_given_as_its_box_makes_the_seg_its_whole_series_mask_makes(tmp_path, spread):
    """Segment.offset: a nodule's box instead of a mask the size of the series. Scattered slices (picked) and
    a dense span (cut as a slice), beside a whole-series mask: the SEG is the same to the byte."""
    src = small_ct()
    n, size = len(src), src[0].Rows
    a, b, c = (np.zeros((n, size, size), bool) for _ in range(3))
    a[2:4, 10:20, 10:20] = True
    a[3, 15, 30] = True
    b[17 if spread else 5, 40:50, 40:50] = True
    c[4, 0:3, 60:64] = True  # at the edge of the frame
    whole = [Segment("a", a, ANAT, LEFT), Segment("b", b, ANAT, RIGHT), Segment("c", c, ANAT, RIGHT)]

    def box(s: Segment, margin: int) -> Segment:
        k, r, col = (np.flatnonzero(s.mask.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
        lo = [max(0, int(v[0]) - margin) for v in (k, r, col)]
        hi = [min(m, int(v[-1]) + 1 + margin) for v, m in zip((k, r, col), s.mask.shape)]
        return Segment(s.label, s.mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].copy(), s.category, s.type,
                       offset=tuple(lo))

    boxed = [box(whole[0], 1), box(whole[1], 0), whole[2]]  # boxes with and without margin, and a whole mask
    assert boxed[0].offset == (1, 9, 9) and boxed[1].mask.shape == (1, 10, 10)
    assert all(np.array_equal(x.full_mask((n, size, size)), y.mask) for x, y in zip(boxed, whole))
    out = []
    for segments in (whole, boxed):
        res = PluginResult(segmentations=[Segmentation(src[0].SeriesInstanceUID, segments)])
        (obj,) = build_results(res, {src[0].SeriesInstanceUID: headers_only(src)}, AlgorithmInfo("p", "1"))
        path = tmp_path / f"seg{len(out)}.dcm"
        obj.dataset.save_as(path, enforce_file_format=True)
        out.append(pydicom.dcmread(path))
    # Every element but the build's own dates and times and highdicom's new DimensionOrganizationUID;
    # sequences compare by their items.
    leaves = [[(e.tag, e.value) for e in ds.iterall()
               if e.VR not in ("SQ", "DA", "TM", "DT") and e.keyword != "DimensionOrganizationUID"] for ds in out]
    assert leaves[0] == leaves[1] and len(leaves[0]) > 100
    assert validate_with_dciodvfy(tmp_path / "seg1.dcm") == []


def test_a_box_outside_its_series_is_a_clear_error():
    src = small_ct()
    for offset, mask in [((18, 0, 0), np.ones((3, 4, 4), bool)), ((0, 62, 0), np.ones((1, 4, 4), bool)),
                         ((-1, 0, 0), np.ones((1, 4, 4), bool)), ((0, 0, 0), np.ones((4, 4), bool))]:
        res = PluginResult(segmentations=[Segmentation(src[0].SeriesInstanceUID, [
            Segment("nodule 1", mask, ANAT, LEFT, offset=offset)])])
        with pytest.raises(ValueError, match=r"segment 'nodule 1': a mask of shape .* does not lie inside series"):
            build_results(res, {src[0].SeriesInstanceUID: headers_only(src)}, AlgorithmInfo("p", "1"))


def test_a_box_offset_that_is_not_three_whole_numbers_is_a_clear_error():
    src = small_ct()
    for offset in [(0, 0), (0.0, 1.7, 0), (0, "2", 0), (True, 0, 0), 5, np.array([0.5, 0, 0])]:
        res = PluginResult(segmentations=[Segmentation(src[0].SeriesInstanceUID, [
            Segment("nodule 1", np.ones((1, 4, 4), bool), ANAT, LEFT, offset=offset)])])
        with pytest.raises(ValueError, match=r"segment 'nodule 1': offset .* must be three whole numbers"):
            build_results(res, {src[0].SeriesInstanceUID: headers_only(src)}, AlgorithmInfo("p", "1"))
    for good in [(np.int64(2), 1, np.int32(0)), np.array([2, 1, 0])]:  # numpy integers are whole numbers
        assert Segment("n", np.ones((1, 4, 4), bool), ANAT, LEFT, offset=good).shape_error((20, 64, 64), "x") is None


def test_finding_without_segment_cites_the_source_images(built):
    src, objs = built
    sr = next(o for o in objs if o.kind == "SR").dataset
    groups = [i for i in content_items(sr) if i.ConceptNameCodeSequence[0].CodeMeaning == "Measurement Group"]
    total = next(g for g in groups if any(getattr(i, "TextValue", None) == "total-lung" for i in content_items(g)))
    cited = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in content_items(total)
             if i.ValueType == "IMAGE"}
    assert cited == {ds.SOPInstanceUID for ds in src}


def test_seg_and_sr_are_separate_numbered_series(built):
    _, objs = built
    seg, sr = (next(o for o in objs if o.kind == k) for k in ("SEG", "SR"))
    assert seg.series_instance_uid != sr.series_instance_uid
    assert (seg.dataset.SeriesNumber, sr.dataset.SeriesNumber) == (9001, 9002)
    assert seg.dataset.Modality == "SEG" and sr.dataset.Modality == "SR"


def test_non_ucum_unit_is_a_clear_error():
    src = small_ct()
    bad = PluginResult(findings=[Finding("x", LUNG, [Measurement(VOLUME, 1.0, Code("ml", "99LOCAL", "ml"))])])
    with pytest.raises(ValueError, match="not UCUM"):
        build_results(bad, {src[0].SeriesInstanceUID: headers_only(src)}, AlgorithmInfo("p", "1"))


def test_pixel_array_is_a_label_map_without_overlap_and_a_stack_with_it():
    from node.results.seg import pixel_array

    shape = (4, 8, 8)
    masks = [np.zeros(shape, bool) for _ in range(3)]
    masks[0][0, :2] = True
    masks[1][1:3, 3:5] = True
    masks[2][3, 6:] = True
    seg = Segmentation("1.2", [Segment(f"s{i}", m, LUNG, LUNG) for i, m in enumerate(masks)])
    labels = pixel_array(seg)
    expected = np.zeros(shape, np.uint8)
    for i, m in enumerate(masks, start=1):
        expected[m] = i
    assert labels.dtype == np.uint8 and np.array_equal(labels, expected)
    masks[2][1, 3, 3] = True  # now overlaps segment 2
    stack = pixel_array(Segmentation("1.2", [Segment(f"s{i}", m, LUNG, LUNG) for i, m in enumerate(masks)]))
    assert stack.shape == (*shape, 3) and np.array_equal(stack[..., 2], masks[2])


def test_pixel_array_label_map_across_chunks():
    from node.results.seg import LABEL_CHUNK_FRAMES, pixel_array

    shape = (2 * LABEL_CHUNK_FRAMES + 3, 6, 6)  # a last chunk shorter than the others
    rng = np.random.default_rng(7)
    owner = rng.integers(0, 4, shape)  # 0: background, else the one segment a voxel belongs to
    masks = [owner == i for i in (1, 2, 3)]
    seg = Segmentation("1.2", [Segment(f"s{i}", m, LUNG, LUNG) for i, m in enumerate(masks)])
    assert np.array_equal(pixel_array(seg), owner.astype(np.uint8))
    masks[0][-1, -1, -1] = masks[2][-1, -1, -1] = True  # an overlap in the last chunk only
    stack = pixel_array(Segmentation("1.2", [Segment(f"s{i}", m, LUNG, LUNG) for i, m in enumerate(masks)]))
    assert stack.shape == (*shape, 3) and all(np.array_equal(stack[..., i], m) for i, m in enumerate(masks))
