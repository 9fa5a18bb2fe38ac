"""`ainode audit verify`: walk the chain and name the first line that breaks it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from node.audit.log import GENESIS, head_path, record_hash


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int
    bad_line: int | None = None  # 1-based
    reason: str = ""


def verify_log(path: Path) -> VerifyResult:
    path = Path(path)
    if not path.exists():
        return VerifyResult(False, 0, None, f"{path}: no such audit log")
    prev = GENESIS
    expected_seq = 1
    n = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            n = lineno
            try:
                rec = json.loads(raw)
                stored = rec.pop("hash")
            except (ValueError, KeyError, AttributeError):
                return VerifyResult(False, lineno - 1, lineno, "not a valid audit record (JSON or hash missing)")
            if rec.get("prev") != prev:
                return VerifyResult(
                    False, lineno - 1, lineno,
                    "chain broken: 'prev' does not match the previous record (a record was removed, "
                    "inserted or reordered before this line)",
                )
            if record_hash(rec) != stored:
                return VerifyResult(False, lineno - 1, lineno, "record content does not match its hash (edited)")
            if rec.get("seq") != expected_seq:
                return VerifyResult(False, lineno - 1, lineno, f"sequence number {rec.get('seq')} where {expected_seq} was expected")
            prev = stored
            expected_seq += 1
    hp = head_path(path)
    if hp.exists():
        try:
            head = json.loads(hp.read_text())
        except ValueError:
            return VerifyResult(False, n, None, f"{hp}: head file is not valid JSON")
        if head.get("seq") != expected_seq - 1 or head.get("hash") != prev:
            return VerifyResult(
                False, n, n + 1 if head.get("seq", 0) > n else n,
                f"the log ends at record {expected_seq - 1} but {hp.name} records {head.get('seq')}: "
                "records were removed from the end",
            )
    return VerifyResult(True, n)
