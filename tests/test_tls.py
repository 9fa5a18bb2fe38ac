"""DICOM TLS: the node's SCP with client certificates (DCMTK clients), its SCU toward a TLS PACS (Orthanc),
and config errors that name the file at fault. Certificates come from a CA the test makes."""

import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import load_config
from node.config.load import ConfigError
from node.config.schema import Destination
from node.config.tls import config_dir, tls_errors
from node.dispatch.cstore import Outgoing, SendError, send_files
from node.synth import write_chest_ct
from tests.conftest import require
from tests.support.certs import Pki, make_pki
from tests.support.orthanc import OrthancServer
from tests.support.pipeline import events, lung_config, result_instances
from tests.support.wait import wait_until

CT_SMALL = pydicom.data.get_testdata_file("CT_small.dcm")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def node_tls(pki: Pki, **extra) -> dict:
    return {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key), "ca_file": str(pki.ca),
            "require_client_cert": True, **extra}


def dcmtk(tool: str, node, *args: str, tls: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    require(tool, "dcmtk")
    return subprocess.run([tool, *tls, "-aet", "MODALITY", "-aec", node.ae_title, "127.0.0.1", str(node.port), *args],
                          capture_output=True, text=True, timeout=60)


def with_cert(pair, pki: Pki) -> tuple[str, ...]:
    """DCMTK options: TLS with this client key pair, trusting the test CA for the server."""
    return ("+tls", str(pair.key), str(pair.cert), "+cf", str(pki.ca))


def test_node_over_tls_takes_dcmtk_clients_with_a_trusted_certificate_only(pki, node_factory):
    node = node_factory({"node": {"tls": node_tls(pki)}, "rules": []})

    assert dcmtk("echoscu", node, tls=with_cert(pki.client, pki)).returncode == 0
    r = dcmtk("storescu", node, CT_SMALL, tls=with_cert(pki.client, pki))
    assert r.returncode == 0, r.stderr
    [stored] = events(node, "instance-stored")
    assert stored["sop_instance_uid"] == pydicom.dcmread(CT_SMALL).SOPInstanceUID
    accepted = events(node, "association-accepted")
    assert len(accepted) == 2
    assert all(a["tls_version"] in ("TLSv1.2", "TLSv1.3") and a["peer_cert_subject"] == pki.client.subject
               for a in accepted)

    refused = {
        "untrusted": dcmtk("storescu", node, CT_SMALL, tls=with_cert(pki.untrusted, pki)),
        "no client certificate": dcmtk("storescu", node, CT_SMALL, tls=("+tla", "+cf", str(pki.ca))),
        "plain TCP": dcmtk("storescu", node, CT_SMALL),
    }
    assert {name: r.returncode != 0 for name, r in refused.items()} == dict.fromkeys(refused, True)
    wait_until(lambda: len(events(node, "tls-handshake-failed")) == 3, 10, "three handshake failures audited")
    reasons = " | ".join(e["reason"] for e in events(node, "tls-handshake-failed"))
    assert "CERTIFICATE_VERIFY_FAILED" in reasons and "WRONG_VERSION_NUMBER" in reasons, reasons
    assert len(events(node, "instance-stored")) == 1 and len(events(node, "association-accepted")) == 2
    log = node.log_path.read_text()
    assert f"peer_cert={pki.client.subject}" in log and "tls handshake failed" in log
    assert "CompressedSamples" not in log  # CT_small's patient name: no patient data in the log


def test_receive_processes_take_tls_associations_in_turns(pki, node_factory):
    """node.receive_processes 2 over TLS: a failed handshake is counted off at once, and while the node process
    holds an association the next goes to the receive process, which handshakes and stores."""
    node = node_factory({"node": {"tls": node_tls(pki), "receive_processes": 2}, "rules": []})
    wait_until(lambda: "receive processes listening" in node.log_path.read_text(), 60, "receive processes")
    assert dcmtk("storescu", node, CT_SMALL).returncode != 0  # plain TCP: no TLS hello
    wait_until(lambda: len(events(node, "tls-handshake-failed")) == 1, 10, "the handshake failure audited")
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.check_hostname = False
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, tls_args=(ctx, None))
    assert held.is_established
    try:
        r = dcmtk("storescu", node, CT_SMALL, tls=with_cert(pki.client, pki))
        assert r.returncode == 0, r.stderr
    finally:
        held.release()
    wait_until(lambda: len(events(node, "association-accepted")) == 2, 10, "both associations audited")
    takers = {a["calling_ae"]: a["receiver_pid"] for a in events(node, "association-accepted")}
    assert takers["HOLDER"] == node.proc.pid and takers["MODALITY"] != node.proc.pid
    assert len(events(node, "instance-stored")) == 1


def test_scu_verifies_the_scp_certificate_and_presents_its_own(pki, node_factory, tmp_path):
    """The dispatcher's C-STORE SCU (pynetdicom) against the node's own TLS SCP."""
    node = node_factory({"node": {"tls": node_tls(pki)}, "rules": []})
    ds = pydicom.dcmread(CT_SMALL)
    files = [Outgoing(ds.SOPInstanceUID, ds.SOPClassUID, Path(CT_SMALL))]

    def dest(**tls) -> Destination:
        return Destination(ae_title=node.ae_title, host="127.0.0.1", port=node.port, timeout_s=5, tls=tls)

    mine = {"cert_file": pki.client.cert, "key_file": pki.client.key}
    # verify_hostname: the server certificate's IP SAN is 127.0.0.1, the host we connect to
    assert send_files(dest(ca_file=pki.ca, verify_hostname=True, **mine), "NODE", files) == {ds.SOPInstanceUID: None}

    with pytest.raises(SendError, match=r"TLS connection to AINODE@127\.0\.0\.1:\d+ failed: certificate verify failed"):
        send_files(dest(ca_file=pki.other_ca, **mine), "NODE", files)  # we do not trust the node's CA
    with pytest.raises(SendError, match=r"TLS"):
        send_files(dest(ca_file=pki.ca), "NODE", files)  # the node wants our certificate
    with pytest.raises(SendError, match=r"tls\.key_file: .* is not the private key of"):
        send_files(dest(ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.server.key), "NODE", files)
    assert len(events(node, "instance-stored")) == 1


def test_study_from_a_tls_pacs_and_results_back_over_tls(pki, tmp_path, node_factory):
    """Orthanc with DICOM TLS (client certificates required both ways) sends a study and receives SEG + SR."""
    ct = write_chest_ct(tmp_path / "ct", slices=20, rows=128, cols=128, pixel_spacing=2.8, slice_thickness=5.0)
    orthanc_tls = {"DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server.cert),
                   "DicomTlsPrivateKey": str(pki.server.key), "DicomTlsTrustedCertificates": str(pki.ca),
                   "DicomTlsRemoteCertificateRequired": True}
    with OrthancServer(tmp_path / "orthanc", extra_config=orthanc_tls) as orthanc:
        plain = subprocess.run([require("echoscu", "dcmtk"), "-aec", orthanc.aet, "127.0.0.1",
                                str(orthanc.dicom_port)], capture_output=True, text=True, timeout=30)
        assert plain.returncode != 0, "Orthanc's DICOM port should take TLS only"
        cfg = lung_config(orthanc, tls={"cert_file": str(pki.client.cert), "key_file": str(pki.client.key),
                                        "ca_file": str(pki.ca)})
        node = node_factory({**cfg, "node": {"tls": node_tls(pki)}})
        orthanc.upload_files(ct.files)
        orthanc.client.modalities.configure("ainode", {"AET": node.ae_title, "Host": "127.0.0.1", "Port": node.port,
                                                       "UseDicomTls": True})
        orthanc.send_study_to_modality("ainode", orthanc.find_study(ct.study_uid))

        wait_until(lambda: result_instances(orthanc, ct.study_uid) == {"SEG": 1, "SR": 1}, 90, "SEG and SR in Orthanc")
        # the node audits a send once Orthanc has answered it: Orthanc can show the results a moment earlier
        wait_until(lambda: len(events(node, "object-sent")) == 2, 10, "two object-sent records")
        [accepted] = events(node, "association-accepted")
        assert accepted["calling_ae"] == orthanc.aet and accepted["peer_cert_subject"] == pki.server.subject


# ---- config --------------------------------------------------------------------------------------------


def write_config(folder: Path, node_tls: dict | None = None, dest_tls: dict | None = None) -> Path:
    cfg: dict = {"node": {}, "rules": [], "plugins": {}}
    if node_tls is not None:
        cfg["node"]["tls"] = node_tls
    if dest_tls is not None:
        cfg["destinations"] = {"pacs": {"ae_title": "PACS", "host": "10.0.0.5", "port": 2762, "tls": dest_tls}}
    path = folder / "node.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def errors_of(path: Path) -> list[str]:
    loaded = load_config(path)
    return tls_errors(loaded.config, config_dir(loaded.source))


def test_tls_files_are_checked_at_load_relative_to_the_config_file(pki, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    for f in (pki.server.cert, pki.server.key, pki.client.cert, pki.client.key, pki.ca):
        shutil.copy(f, certs)
    (certs / "junk.pem").write_text("not PEM\n")
    good = {"cert_file": "certs/server.crt", "key_file": "certs/server.key", "ca_file": "certs/test-ca.crt",
            "require_client_cert": True}
    assert errors_of(write_config(tmp_path, good, {"ca_file": "certs/test-ca.crt"})) == []

    assert errors_of(write_config(tmp_path, {**good, "key_file": "certs/missing.key"})) == [
        f"node.tls.key_file: file not found: {certs / 'missing.key'}"]
    [err] = errors_of(write_config(tmp_path, {**good, "key_file": "certs/client.key"}))
    assert err.startswith("node.tls.key_file: ") and f"{certs / 'client.key'} is not the private key of " \
        f"{certs / 'server.crt'}" in err
    [err] = errors_of(write_config(tmp_path, {**good, "cert_file": "certs/junk.pem"}))
    assert err == f"node.tls.cert_file: {certs / 'junk.pem'} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    [err] = errors_of(write_config(tmp_path, None, {"ca_file": "certs/junk.pem"}))
    assert err.startswith(f"destinations.pacs.tls.ca_file: {certs / 'junk.pem'} holds no PEM certificate")
    encrypted = certs / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(pki.server.key), "-aes256", "-passout", "pass:x",
                    "-out", str(encrypted)], check=True, capture_output=True)
    [err] = errors_of(write_config(tmp_path, {**good, "key_file": "certs/encrypted.key"}))
    assert err.startswith(f"node.tls.key_file: {encrypted} is an encrypted private key")

    wrong_side = errors_of(write_config(tmp_path, {**good, "verify_hostname": True},
                                        {"ca_file": "certs/test-ca.crt", "require_client_cert": True,
                                         "cert_file": "certs/client.crt", "key_file": "certs/client.key"}))
    assert [e.split(":")[0] for e in wrong_side] == ["node.tls.verify_hostname",
                                                    "destinations.pacs.tls.require_client_cert"]

    with pytest.raises(ConfigError, match=r"node\.tls: .*require_client_cert needs ca_file"):
        load_config(write_config(tmp_path, {"cert_file": "certs/server.crt", "require_client_cert": True}))


def test_check_config_and_serve_refuse_a_missing_tls_file(pki, tmp_path):
    path = write_config(tmp_path, {"cert_file": str(pki.server.cert), "key_file": "nowhere/server.key"})
    for command in (["check-config", str(path)], ["serve", "--config", str(path)]):
        r = subprocess.run([sys.executable, "-m", "node.cli", *command],
                           capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
        assert r.returncode == 2, (command, r.stdout, r.stderr)
        assert f"{path}: node.tls.key_file: file not found: {tmp_path / 'nowhere/server.key'}" in r.stderr, r.stderr
