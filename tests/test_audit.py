"""The audit log's hash chain detects edits, removals and reorderings."""

import json
import subprocess
import sys

from node.audit import AuditLog, verify_log


def make_log(path, n=5):
    log = AuditLog(path, node_ae="AINODE")
    for i in range(n):
        log.append("instance-stored", study_uid=f"1.2.3.{i}", calling_ae="ORTHANC")
    log.close()
    return path


def verify_cli(path):
    return subprocess.run([sys.executable, "-m", "node.cli", "audit", "verify", "--log", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_intact_log_verifies(tmp_path):
    p = make_log(tmp_path / "audit.jsonl")
    r = verify_cli(p)
    assert r.returncode == 0, r.stderr
    assert "5 records" in r.stdout


def test_reopen_continues_the_chain(tmp_path):
    p = make_log(tmp_path / "audit.jsonl", 3)
    log = AuditLog(p)
    rec = log.append("node-start")
    log.close()
    assert rec["seq"] == 4
    assert verify_log(p).ok


def test_one_edited_character_names_the_line(tmp_path):
    p = make_log(tmp_path / "audit.jsonl")
    lines = p.read_text().splitlines()
    lines[2] = lines[2].replace("1.2.3.2", "1.2.3.9")
    p.write_text("\n".join(lines) + "\n")
    r = verify_cli(p)
    assert r.returncode != 0
    assert "line 3" in r.stderr and "edited" in r.stderr


def test_removed_line_is_detected(tmp_path):
    p = make_log(tmp_path / "audit.jsonl")
    lines = p.read_text().splitlines()
    del lines[1]
    p.write_text("\n".join(lines) + "\n")
    res = verify_log(p)
    assert not res.ok and res.bad_line == 2


def test_reordered_lines_are_detected(tmp_path):
    p = make_log(tmp_path / "audit.jsonl")
    lines = p.read_text().splitlines()
    lines[1], lines[3] = lines[3], lines[1]
    p.write_text("\n".join(lines) + "\n")
    res = verify_log(p)
    assert not res.ok and res.bad_line == 2


def test_truncated_tail_is_detected(tmp_path):
    p = make_log(tmp_path / "audit.jsonl")
    lines = p.read_text().splitlines()
    p.write_text("\n".join(lines[:-1]) + "\n")
    res = verify_log(p)
    assert not res.ok and "removed from the end" in res.reason


def test_recomputed_hash_still_breaks_the_next_link(tmp_path):
    """An attacker who rewrites a record and its hash still breaks the following record's 'prev'."""
    from node.audit.log import record_hash, canonical

    p = make_log(tmp_path / "audit.jsonl")
    lines = p.read_text().splitlines()
    rec = json.loads(lines[1])
    rec.pop("hash")
    rec["calling_ae"] = "EVIL"
    rec["hash"] = record_hash(rec)
    lines[1] = canonical(rec).decode()
    p.write_text("\n".join(lines) + "\n")
    res = verify_log(p)
    assert not res.ok and res.bad_line == 3
