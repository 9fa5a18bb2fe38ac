"""Usage metering and rule replay against a known run of a real node (issue 6)."""

from __future__ import annotations

import csv
import hashlib
from datetime import datetime

import pydicom
import pytest
import yaml

from node.synth import write_chest_ct
from tests.support.node_proc import NodeProcess
from tests.support.pipeline import query, send
from tests.support.wait import wait_until

# sender AE → InstitutionalDepartmentName put in its headers (None: not set)
SENDERS = {"CT1": None, "CT2": None, "CT3": "Emergency Radiology", "XRAY9": None}
DEPARTMENTS = {"by_calling_ae": {"CT1": "Radiology", "ct2": "Radiology", "CT3": "Radiology"},
               "by_institutional_department": {"emergency radiology": "ER"}}
RULES_A = [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Four studies from four senders through ct_lung (no destination); the node is stopped afterwards.

    One test uses it (checking usage, then replay), so that pytest-xdist never runs it twice.
    """
    tmp = tmp_path_factory.mktemp("usage")
    node = NodeProcess(tmp / "node", {"departments": DEPARTMENTS, "rules": RULES_A})
    studies = {}
    try:
        node.start()
        for seed, (ae, dept) in enumerate(SENDERS.items()):
            ct = write_chest_ct(tmp / ae, slices=20, slice_thickness=6.0, rows=128, cols=128,
                                pixel_spacing=2.8, seed=seed, patient_id=f"P{seed}")
            if dept:
                for f in ct.files:
                    ds = pydicom.dcmread(f)
                    ds.InstitutionalDepartmentName = dept
                    ds.save_as(f)
            send(node, ct.files, calling=ae)
            studies[ae] = pydicom.dcmread(ct.files[0], stop_before_pixels=True).StudyInstanceUID
        states = wait_until(lambda: len(s := query(node, "SELECT state, error FROM jobs")) == 4 and all(
            st not in ("queued", "running") for st, _ in s) and s, 120, "four ct_lung jobs finished")
        assert [st for st, _ in states] == ["done-no-destination"] * 4, states
        assert node.stop() == 0
        yield node, studies
    finally:
        node.kill()


def usage(node, *args):
    return node.cli("report", "usage", "--config", str(node.config_path), *args)


def check_usage_report_matches_the_known_run(run, tmp_path):
    node, _ = run
    out = tmp_path / "usage.csv"
    month = datetime.now().strftime("%Y-%m")
    r = usage(node, "--month", month, "--by", "plugin,department", "--csv", str(out))
    assert r.returncode == 0, r.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(x["plugin"], x["department"], x["studies"], x["jobs"], x["failed_jobs"]) for x in rows] == [
        ("ct_lung", "ER", "1", "1", "0"), ("ct_lung", "Radiology", "2", "2", "0"),
        ("ct_lung", "unassigned", "1", "1", "0"), ("TOTAL", "", "4", "4", "0")]
    assert all(x["month"] == month for x in rows)
    for dept, n in (("ER", 1), ("Radiology", 2), ("unassigned", 1)):
        assert any(line.split() == ["│", "ct_lung", "│", dept, "│", str(n), "│", str(n), "│", "0", "│"]
                   for line in r.stdout.splitlines()), r.stdout
    by_ae = usage(node, "--month", month, "--by", "calling_ae")
    assert by_ae.returncode == 0, by_ae.stderr
    for ae in SENDERS:
        assert any(line.split()[:4] == ["│", ae, "│", "1"] for line in by_ae.stdout.splitlines()), by_ae.stdout


def check_usage_of_an_empty_month_is_zero_and_says_so(run, tmp_path):
    node, _ = run
    out = tmp_path / "empty.csv"
    r = usage(node, "--month", "2020-02", "--csv", str(out))
    assert r.returncode == 0, r.stderr
    assert "no jobs finished in 2020-02: every count is 0" in r.stdout
    with open(out, newline="") as f:
        assert list(csv.reader(f)) == [["month", "plugin", "department", "studies", "jobs", "failed_jobs"],
                                       ["2020-02", "TOTAL", "", "0", "0", "0"]]
    bad = usage(node, "--month", "11/2026")
    assert bad.returncode == 2 and "expected YYYY-MM" in bad.stderr


def _fingerprint(node) -> dict[str, str]:
    """The store's data (the database file and its write-ahead log) and the audit log, byte for byte.

    Not ainode.db-shm: SQLite's shared-memory lock index, which any reader (even mode=ro) may touch.
    """
    files = [node.var / "ainode.db", node.var / "ainode.db-wal", node.audit_path, node.var / "audit.jsonl.head"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "absent" for p in files}


def _replay(node, tmp_path, rules, name):
    new = {**node.config, "rules": rules}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(new))
    r = node.cli("replay", "--config", str(path), "--db-config", str(node.config_path), "--since", "1d")
    assert r.returncode == 0, r.stderr
    changed = {line.split()[1]: [] for line in r.stdout.splitlines() if line.startswith("study ")}
    current = None
    for line in r.stdout.splitlines():
        if line.startswith("study "):
            current = line.split()[1]
        elif line.startswith("  ") and current:
            changed[current].append(line.strip())
    return r, changed


def check_replay_lists_exactly_the_studies_a_changed_rule_reroutes_and_writes_nothing(run, tmp_path):
    node, uids = run
    before = _fingerprint(node)
    same, changed = _replay(node, tmp_path, RULES_A, "same")
    assert changed == {} and "0 of 4 routed studies" in same.stdout

    rules_b = [{"name": "lung", "study": {"calling_ae": ["CT1", "CT2"]}, "series": {"modality": "CT"},
                "plugin": "ct_lung"},
               {"name": "lung_er", "study": {"calling_ae": ["CT3"]}, "series": {"modality": "CT"},
                "plugin": "ct_lung", "priority": "stat"}]
    r, changed = _replay(node, tmp_path, rules_b, "b")
    assert set(changed) == {uids["CT3"], uids["XRAY9"]}, r.stdout
    assert [c.split(":")[0] for c in changed[uids["CT3"]]] == ["- rule lung", "+ rule lung_er"]
    assert "priority stat" in changed[uids["CT3"]][1]
    assert [c.split(":")[0] for c in changed[uids["XRAY9"]]] == ["- rule lung"]
    assert "2 of 4 routed studies" in r.stdout

    rules_c = [{**RULES_A[0], "priority": "stat"}]
    r, changed = _replay(node, tmp_path, rules_c, "c")
    assert set(changed) == set(uids.values())
    assert all(c == ["~ rule lung: priority routine → stat"] for c in changed.values()), r.stdout

    assert _fingerprint(node) == before, "replay changed the store or the audit log"


def test_usage_report_and_replay_of_a_known_run(run, tmp_path):
    check_usage_report_matches_the_known_run(run, tmp_path)
    check_usage_of_an_empty_month_is_zero_and_says_so(run, tmp_path)
    check_replay_lists_exactly_the_studies_a_changed_rule_reroutes_and_writes_nothing(run, tmp_path)


def test_departments_section_order_and_errors(tmp_path):
    from node.config import ConfigError, load_config
    from node.report.config import DepartmentsSection

    d = DepartmentsSection.model_validate(DEPARTMENTS)
    assert d.department("ct3", "EMERGENCY RADIOLOGY ") == "ER"  # the header wins over the sender
    assert d.department("CT2", "Cardiology") == "Radiology"
    assert d.department("XRAY9", None) == d.department(None, None) == "unassigned"
    for section, message in (({"by_ae": {"CT1": "R"}}, "departments.by_ae: unknown key"),
                             ({"by_calling_ae": {"CT1": " "}}, "departments.by_calling_ae: blank name or department")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({"departments": section}))
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert any(e.startswith(f"{path}: {message}") for e in exc.value.errors), exc.value.errors
