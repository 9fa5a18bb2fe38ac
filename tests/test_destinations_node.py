"""The running node serves two kinds of PACS from one rule: one reached by C-STORE whose viewers cannot show
SEG (it gets SR, a GSPS overlay and key images instead), one reached by DICOMweb STOW-RS (SEG and SR)."""

import io

from pydicom import dcmread

from node.synth import write_chest_ct
from tests.support.orthanc import OrthancServer
from tests.support.pipeline import events, send
from tests.support.wait import wait_until


def _modalities(orthanc, study_uid: str) -> dict[str, int]:
    study = orthanc.find_study(study_uid)
    out: dict[str, int] = {}
    for s in orthanc.series_of_study(study) if study else []:
        mod = s["MainDicomTags"].get("Modality")
        out[mod] = out.get(mod, 0) + len(s["Instances"])
    return out


def test_no_seg_viewer_gets_gsps_and_key_images_and_dicomweb_pacs_gets_seg_by_stow(tmp_path, node_factory):
    with OrthancServer(tmp_path / "viewer", aet="VIEWER") as viewer, \
            OrthancServer(tmp_path / "web", aet="WEBPACS", dicomweb=True) as web:
        node = node_factory({
            "assemble": {"quiet_period_s": 1.0},
            "destinations": {"viewer": {"ae_title": "VIEWER", "host": "127.0.0.1", "port": viewer.dicom_port,
                                        "accepts": ["SR", "GSPS", "SC"], "max_key_images": 1}},
            "dicomweb": {"web": {"url": f"http://127.0.0.1:{web.http_port}/dicom-web"}},
            "rules": [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung",
                       "destinations": ["viewer", "web"]}],
        })
        ct = write_chest_ct(tmp_path / "ct", slices=30, slice_thickness=5.0, rows=256, cols=256, pixel_spacing=1.4)
        send(node, ct.files)
        wait_until(lambda: {"SR", "PR", "OT"} <= set(_modalities(viewer, ct.study_uid)) and
                   {"SR", "SEG"} <= set(_modalities(web, ct.study_uid)), 120, "results in both PACS")

        on_viewer = _modalities(viewer, ct.study_uid)
        assert "SEG" not in on_viewer and on_viewer["PR"] == 1  # one GSPS for the CT series
        assert on_viewer["OT"] >= 1  # key images (secondary capture)
        assert set(_modalities(web, ct.study_uid)) == {"SR", "SEG"}  # the CT itself was never sent there
        sent = events(node, "object-sent")
        assert {(r["destination"], r["kind"]) for r in sent} == {
            ("viewer", "SR"), ("viewer", "GSPS"), ("viewer", "SC"), ("web", "SR"), ("web", "SEG")}
        assert all(r["dest_url"].endswith("/dicom-web") for r in sent if r["destination"] == "web")

        # The key image carries the warning in its pixels and says so in its header.
        sc_id = next(s for s in viewer.series_of_study(viewer.find_study(ct.study_uid))
                     if s["MainDicomTags"].get("Modality") == "OT")["Instances"][0]
        ds = dcmread(io.BytesIO(viewer.get_instance_file(sc_id)))
        assert ds.BurnedInAnnotation == "YES" and ds.StudyInstanceUID == ct.study_uid
        assert node.stop() == 0
