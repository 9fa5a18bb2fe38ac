"""DICOMweb STOW-RS dispatch (node/dispatch/stow.py) against a real Orthanc with its DICOMweb plugin, plus a
stand-in HTTP server for what Orthanc cannot be made to answer (202, 503, redirects, XML, bearer tokens, TLS)."""

from __future__ import annotations

import json
import logging
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.uid import generate_uid

from node.dispatch.cstore import Outgoing, SendError
from node.config.dicomweb import DicomWebDestination
from node.dispatch.stow import StowError, StowFailure, parse_answer, send_stow
from node.plugin_api import StudyInput
from node.results import AlgorithmInfo, build_results
from node.run.series_loader import load_series
from node.synth import write_chest_ct
from plugins.ct_lung import CtLungPlugin
from tests.support.certs import make_pki
from tests.support.net import free_port
from tests.support.orthanc import OrthancServer

pytestmark = pytest.mark.timeout(120)


@dataclass
class Built:
    study_uid: str
    ct_files: list[Path]
    sr: Outgoing
    seg: Outgoing


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """An SR and a SEG made as the node makes them: ct_lung on a small synthetic chest CT, build_results, and
    Part 10 files written with enforce_file_format (node/run/job_process.py)."""
    d = tmp_path_factory.mktemp("stow")
    synth = write_chest_ct(d / "ct", slices=40, slice_thickness=5.0, rows=256, cols=256, pixel_spacing=1.4)
    vol, headers = load_series(synth.files)
    result = CtLungPlugin().run(StudyInput(str(headers[0].StudyInstanceUID), [vol], d))
    objects = build_results(result, {vol.series_uid: headers}, AlgorithmInfo("ct_lung", "1.0.0"))
    out = {}
    for o in objects:
        path = d / f"{o.kind}-{o.sop_instance_uid}.dcm"
        o.dataset.save_as(path, enforce_file_format=True)
        out[o.kind] = Outgoing(o.sop_instance_uid, o.sop_class_uid, path)
    return Built(str(headers[0].StudyInstanceUID), list(synth.files), out["SR"], out["SEG"])


def orthanc_instances(o: OrthancServer, study_uid: str, modality: str) -> dict[str, str]:
    """{SOP Instance UID: Orthanc id} of the study's series of `modality`."""
    out = {}
    for s in o.wait_for_series(study_uid, modality, timeout=10):
        for i in o.instances_of_series(s["ID"]):
            out[i["MainDicomTags"]["SOPInstanceUID"]] = i["ID"]
    return out


# ---- against Orthanc ---------------------------------------------------------------------------------------


def test_sr_and_seg_are_stored_in_the_source_study(tmp_path, built):
    with OrthancServer(tmp_path / "orthanc", dicomweb=True) as o:
        o.upload_files(built.ct_files)  # the PACS holds the source study, as in production
        dest = DicomWebDestination(url=f"{o.http_url}/dicom-web/")
        files = [built.seg, built.sr]
        assert send_stow(dest, files) == {built.seg.sop_instance_uid: None, built.sr.sop_instance_uid: None}

        study = o.find_study(built.study_uid)
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in o.series_of_study(study))
        assert modalities == ["CT", "SEG", "SR"]  # one study: the results sit beside their source series
        for f, modality in ((built.seg, "SEG"), (built.sr, "SR")):
            ids = orthanc_instances(o, built.study_uid, modality)
            assert list(ids) == [f.sop_instance_uid]
            assert o.get_instance_file(ids[f.sop_instance_uid]) == f.path.read_bytes()  # byte for byte
        count = o.statistics()["CountInstances"]

        # A resend (same UIDs, as after a lost answer or a re-run) replaces, never duplicates; one POST per file.
        small = DicomWebDestination(url=f"{o.http_url}/dicom-web", max_batch_mb=0.01)
        assert send_stow(small, files) == {f.sop_instance_uid: None for f in files}
        assert o.statistics()["CountInstances"] == count


def test_wrong_url_or_no_pacs_is_a_clear_error(tmp_path, built):
    with OrthancServer(tmp_path / "orthanc", dicomweb=True) as o:
        url = f"{o.http_url}/dicomweb"  # the plugin's root is /dicom-web/
        with pytest.raises(StowError) as err:
            send_stow(DicomWebDestination(url=url), [built.sr])
        assert isinstance(err.value, SendError)  # the dispatcher already catches SendError
        assert err.value.status == 404 and not err.value.retryable
        msg = str(err.value)
        assert f"{url}/studies" in msg and "HTTP 404" in msg and "check url" in msg and "/dicom-web" in msg
        assert o.statistics()["CountInstances"] == 0

    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens: the PACS is down
    with pytest.raises(StowError, match="connection refused") as err:
        send_stow(DicomWebDestination(url=url, timeout_s=3), [built.sr])
    assert err.value.retryable and err.value.status is None and url in str(err.value)


def test_auth_failures_are_clear_and_never_show_the_secret(tmp_path, built, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    password = "s3cret-Pw"
    users = {"AuthenticationEnabled": True, "RegisteredUsers": {"ainode": password}}
    with OrthancServer(tmp_path / "orthanc", dicomweb=True, extra_config=users) as o:
        base = f"{o.http_url}/dicom-web"
        with pytest.raises(StowError) as err:
            send_stow(DicomWebDestination(url=base), [built.sr])
        assert err.value.status == 401 and not err.value.retryable
        assert "wants credentials: set username" in str(err.value)

        monkeypatch.setenv("STOW_PW", "wrong-" + password)
        with pytest.raises(StowError) as err:
            send_stow(DicomWebDestination(url=base, username="ainode", password_env="STOW_PW"), [built.sr])
        assert err.value.status == 401 and "check username and password_env" in str(err.value)

        monkeypatch.delenv("STOW_PW")
        with pytest.raises(StowError, match="password_env STOW_PW is not set") as err:
            send_stow(DicomWebDestination(url=base, username="ainode", password_env="STOW_PW"), [built.sr])
        assert not err.value.retryable
        assert o.statistics()["CountInstances"] == 0

        secret = tmp_path / "stow-password"
        secret.write_text(password + "\n")
        dest = DicomWebDestination(url=base, username="ainode", password_file=secret)
        assert send_stow(dest, [built.sr, built.seg]) == {built.sr.sop_instance_uid: None,
                                                           built.seg.sop_instance_uid: None}
        assert o.statistics()["CountInstances"] == 2
    assert password not in caplog.text and password not in repr(dest)


def test_an_instance_orthanc_refuses_fails_alone(tmp_path, built):
    """One POST with the SR, the SEG, a result without Study Instance UID (Orthanc lists it in
    FailedSOPSequence, reason 0xC000) and a file that is not DICOM past its preamble (Orthanc cannot
    parse it, so cannot name it): each error lands on its own instance, the others are stored."""
    ds = pydicom.dcmread(built.sr.path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    del ds.StudyInstanceUID
    no_study = tmp_path / "no-study.dcm"
    ds.save_as(no_study, enforce_file_format=True)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"not a data set" * 100)
    missing = Outgoing(generate_uid(), ds.SOPClassUID, tmp_path / "gone.dcm")
    files = [built.sr, Outgoing(str(ds.SOPInstanceUID), str(ds.SOPClassUID), no_study), built.seg,
             Outgoing(generate_uid(), str(ds.SOPClassUID), garbage), missing]

    with OrthancServer(tmp_path / "orthanc", dicomweb=True) as o:
        results = send_stow(DicomWebDestination(url=f"{o.http_url}/dicom-web"), files)
        assert set(results) == {f.sop_instance_uid for f in files}
        assert results[built.sr.sop_instance_uid] is None and results[built.seg.sop_instance_uid] is None
        refused = results[files[1].sop_instance_uid]
        assert isinstance(refused, StowFailure) and "FailureReason 0xC000" in refused and not refused.retryable
        unlisted = results[files[3].sop_instance_uid]
        assert "did not list this instance as stored" in unlisted and not unlisted.retryable
        assert "cannot read" in results[missing.sop_instance_uid]
        assert set(orthanc_instances(o, built.study_uid, "SR")) == {built.sr.sop_instance_uid}
        assert set(orthanc_instances(o, built.study_uid, "SEG")) == {built.seg.sop_instance_uid}
        assert o.statistics()["CountInstances"] == 2


# ---- against a stand-in server -----------------------------------------------------------------------------


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes


class StandIn:
    """Answers each POST with answer(request) -> (status, headers, body); records the requests."""

    def __init__(self, answer: Callable[[Request], tuple[int, dict[str, str], bytes]],
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.answer, self.requests, self.port = answer, [], free_port()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                req = Request(self.path, dict(self.headers), self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(req)
                status, headers, body = outer.answer(req)
                try:
                    self.send_response(status)
                    for k, v in {**headers, "Content-Length": str(len(body))}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> "StandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def parts_of(req: Request) -> list[bytes]:
    ctype = req.headers["Content-Type"]
    assert ctype.startswith('multipart/related; type="application/dicom"; boundary=')
    boundary = ctype.rsplit("boundary=", 1)[1].encode()
    assert req.body.endswith(b"--" + boundary + b"--\r\n")
    chunks = req.body.split(b"--" + boundary)[1:-1]
    out = []
    for c in chunks:
        head, _, data = c.partition(b"\r\n\r\n")
        assert head == b"\r\nContent-Type: application/dicom"
        out.append(data[:-2])  # the CRLF before the next boundary
    return out


def answer_json(referenced=(), failed=()) -> bytes:
    item = lambda uid, extra: {"00081155": {"vr": "UI", "Value": [uid]}, **extra}  # noqa: E731
    return json.dumps({
        "00081199": {"vr": "SQ", "Value": [item(u, {}) for u in referenced]},
        "00081198": {"vr": "SQ", "Value": [item(u, {"00081197": {"vr": "US", "Value": [code]}})
                                           for u, code in failed]},
    }).encode()


def test_request_is_multipart_related_streamed_per_batch_with_a_bearer_token(tmp_path, built):
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    with StandIn(lambda r: (200, {"Content-Type": "application/dicom+json"}, b"")) as pacs:
        dest = DicomWebDestination(url=pacs.url, token_file=token, max_batch_mb=0.01)
        files = [built.sr, built.seg]
        assert send_stow(dest, files) == {f.sop_instance_uid: None for f in files}  # 200, no body: all stored
        assert [len(parts_of(r)) for r in pacs.requests] == [1, 1]  # each file over max_batch_mb: one POST each
        assert [parts_of(r)[0] for r in pacs.requests] == [f.path.read_bytes() for f in files]
        for r in pacs.requests:
            assert r.path == "/dicom-web/studies"
            assert r.headers["Authorization"] == "Bearer tok-123" and r.headers["Accept"] == "application/dicom+json"

        pacs.requests.clear()
        assert send_stow(dest.model_copy(update={"max_batch_mb": 50.0}), files) == {f.sop_instance_uid: None
                                                                                     for f in files}
        assert [len(parts_of(r)) for r in pacs.requests] == [2]


def test_answers_map_to_instances_and_say_what_to_retry(built):
    sr, seg = built.sr.sop_instance_uid, built.seg.sop_instance_uid
    files = [built.sr, built.seg]
    answers = iter([
        (202, {}, answer_json(referenced=[sr], failed=[(seg, 0xA700)])),  # out of resources: retry
        (202, {}, answer_json(referenced=[sr])),  # 202 and the SEG not mentioned: not confirmed, retry
        (409, {}, answer_json(failed=[(sr, 0xA900), (seg, 0xA900)])),  # does not match its SOP class
        (503, {}, b"busy"),
        (302, {"Location": "https://pacs.example.org/dicom-web/studies"}, b""),
        (406, {}, b""),  # no JSON: sent again asking for XML
        (200, {"Content-Type": "application/dicom+xml"}, f"""<?xml version="1.0"?>
         <NativeDicomModel xmlns="http://dicom.nema.org/PS3.19/models/NativeDICOM">
          <DicomAttribute tag="00081198" vr="SQ"><Item number="1">
            <DicomAttribute tag="00081155" vr="UI"><Value number="1">{seg}</Value></DicomAttribute>
            <DicomAttribute tag="00081197" vr="US"><Value number="1">290</Value></DicomAttribute>
          </Item></DicomAttribute>
          <DicomAttribute tag="00081199" vr="SQ"><Item number="1">
            <DicomAttribute tag="00081155" vr="UI"><Value number="1">{sr}</Value></DicomAttribute>
          </Item></DicomAttribute></NativeDicomModel>""".encode()),
    ])
    with StandIn(lambda r: next(answers)) as pacs:
        dest = DicomWebDestination(url=pacs.url)
        r = send_stow(dest, files)
        assert r[sr] is None and "FailureReason 0xA700, refused: out of resources" in r[seg] and r[seg].retryable

        r = send_stow(dest, files)
        assert r[sr] is None and "did not list" in r[seg] and r[seg].retryable

        r = send_stow(dest, files)
        assert all("0xA900" in r[u] and "HTTP 409" in r[u] and not r[u].retryable for u in (sr, seg))

        with pytest.raises(StowError, match="HTTP 503.*will retry") as err:
            send_stow(dest, files)
        assert err.value.retryable

        with pytest.raises(StowError, match="redirect to https://pacs.example.org") as err:
            send_stow(dest, files)
        assert not err.value.retryable and len(pacs.requests) == 5  # the redirect was not followed

        r = send_stow(dest, files)
        assert pacs.requests[-1].headers["Accept"] == "application/dicom+xml"
        assert r[sr] is None and "FailureReason 0x0122, SOP class not supported" in r[seg]


def test_a_pacs_that_does_not_answer_in_time_is_retried(built):
    release = threading.Event()

    def slow(r: Request) -> tuple[int, dict[str, str], bytes]:
        release.wait(5)
        return 200, {}, b""

    with StandIn(slow) as pacs:
        try:
            with pytest.raises(StowError, match=r"no answer within 0.3 s \(timeout_s\)") as err:
                send_stow(DicomWebDestination(url=pacs.url, timeout_s=0.3), [built.sr])
        finally:
            release.set()
    assert err.value.retryable and err.value.status is None


def test_parse_answer_reads_orthanc_json_and_ignores_other_bodies():
    orthanc = b'{"00080005": {"Value": ["ISO_IR 100"], "vr": "CS"}, "00081198": {"vr": "SQ"},' \
              b' "00081199": {"Value": [{"00081155": {"Value": ["1.2.3"], "vr": "UI"}}], "vr": "SQ"}}'
    a = parse_answer(orthanc)
    assert a is not None and a.stored == {"1.2.3": None} and a.failed == {}
    assert parse_answer(b'{"HttpError": "Not Found", "Message": "Unknown resource"}') is None
    assert parse_answer(b"") is None and parse_answer(b"<html>502 Bad Gateway</html>") is None


def test_https_with_ca_file(tmp_path, built):
    pki = make_pki(tmp_path / "pki")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki.server.cert, pki.server.key)
    with StandIn(lambda r: (200, {}, answer_json(referenced=[built.sr.sop_instance_uid])), ctx) as pacs:
        assert send_stow(DicomWebDestination(url=pacs.url, ca_file=pki.ca), [built.sr]) == {
            built.sr.sop_instance_uid: None}
        with pytest.raises(StowError, match="does not verify.*check ca_file") as err:
            send_stow(DicomWebDestination(url=pacs.url, ca_file=pki.other_ca), [built.sr])
        assert not err.value.retryable


def test_config():
    d = DicomWebDestination.model_validate({"url": "https://pacs.example.org/dicom-web/", "token_env": "PACS_TOKEN"})
    assert d.stow_url == "https://pacs.example.org/dicom-web/studies"
    assert (d.max_attempts, d.backoff_initial_s, d.backoff_max_s, d.timeout_s) == (5, 2.0, 300.0, 30.0)
    relative = DicomWebDestination(url="https://p/dw", username="u", password_file=Path("pw"), ca_file=Path("ca.pem"))
    resolved = relative.with_resolved_paths(Path("/etc/ainode"))
    assert resolved.password_file == Path("/etc/ainode/pw") and resolved.ca_file == Path("/etc/ainode/ca.pem")
    bad = [
        {"url": "ftp://pacs/dicom-web"},
        {"url": "http://user:pw@pacs/dicom-web"},  # a secret in the URL would reach the logs
        {"url": "http://pacs/dicom-web/studies"},  # the node adds /studies
        {"url": "http://pacs/dicom-web", "password": "x"},  # no plain secrets: unknown key
        {"url": "http://pacs/dicom-web", "username": "u"},
        {"url": "http://pacs/dicom-web", "password_env": "P"},
        {"url": "http://pacs/dicom-web", "username": "u", "password_env": "P", "password_file": "p"},
        {"url": "http://pacs/dicom-web", "username": "u", "password_env": "P", "token_env": "T"},
        {"url": "http://pacs/dicom-web", "token_env": "T", "token_file": "t"},
        {"url": "http://pacs/dicom-web", "ca_file": "ca.pem"},  # ca_file is for https
        {"url": "http://pacs/dicom-web", "max_batch_mb": 0},
    ]
    for b in bad:
        with pytest.raises(ValidationError):
            DicomWebDestination.model_validate(b)
