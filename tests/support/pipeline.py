"""Shared steps of the tests that run studies through the node into Orthanc."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification


def lung_config(orthanc, **dest: Any) -> dict:
    """ct_lung on every CT, results to `orthanc`; `dest` overrides destination settings."""
    return {
        "assemble": {"quiet_period_s": 1.0},
        "destinations": {"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
                                  "timeout_s": 5, **dest}},
        "rules": [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung", "destinations": ["pacs"]}],
    }


def send(node, files, calling: str = "STORESCU", check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["storescu", "-aet", calling, "-aec", node.ae_title, "127.0.0.1", str(node.port),
                        *map(str, files)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@contextmanager
def held_association(node, calling: str = "HOLDER") -> Iterator[Any]:
    """An association to the node, open until the block ends (C-ECHO and CT C-STORE)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established, f"association {calling} -> {node.ae_title} not established"
    try:
        yield assoc
    finally:
        assoc.release()
        ae.shutdown()


def result_instances(orthanc, study_uid: str) -> dict[str, int]:
    """{modality: number of instances} of the AI results in the PACS study."""
    study = orthanc.find_study(study_uid)
    out: dict[str, int] = {}
    for s in orthanc.series_of_study(study) if study else []:
        mod = s["MainDicomTags"].get("Modality")
        if mod in ("SEG", "SR"):
            out[mod] = out.get(mod, 0) + len(s["Instances"])
    return out


def status(node) -> str:
    return node.cli("status", "--config", str(node.config_path)).stdout


def query(node, sql: str, *args: Any) -> list[tuple]:
    """Read the node's store directly (read-only), as an auditor would."""
    con = sqlite3.connect(f"file:{node.var / 'ainode.db'}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def events(node, name: str) -> list[dict]:
    return [r for r in node.audit_records() if r["event"] == name]
