"""Keyed pseudonyms: HMAC-SHA256 of the original under the node's secret key.

Deterministic, so every instance of a series gets the same new series UID and a patient keeps one
pseudonym across studies and sends; without the key nobody can recompute them from a guessed original
(a plain hash of a patient ID could be reversed by trying every ID).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid


def _mac(key: bytes, kind: str, value: str) -> bytes:
    return hmac.new(key, f"{kind}\x1f{value}".encode(), hashlib.sha256).digest()


def key_id(key: bytes) -> str:
    """A short fingerprint of the key, stored with each pair so a key change can be told apart."""
    return hashlib.sha256(b"ainode-deid-key-id\x00" + key).hexdigest()[:16]


def keyed_uid(key: bytes, uid: str) -> str:
    """A 2.25 UID (at most 44 characters) from a UUIDv8 holding 122 bits of HMAC(key, uid)."""
    raw = bytearray(_mac(key, "uid", uid)[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80  # version 8 (RFC 9562 custom UUID)
    raw[8] = (raw[8] & 0x3F) | 0x80  # RFC 4122 variant
    return f"2.25.{uuid.UUID(bytes=bytes(raw)).int}"


def keyed_token(key: bytes, kind: str, value: str, length: int) -> str:
    """`length` characters of base32 (A-Z, 2-7) of HMAC(key, kind, value): valid in LO, SH and PN."""
    return base64.b32encode(_mac(key, kind, value)).decode()[:length]


def date_shift_days(key: bytes, patient_id: str, max_days: int) -> int:
    """1..max_days: how far back this patient's dates move (the same for all of the patient's studies)."""
    return 1 + int.from_bytes(_mac(key, "date-shift", patient_id)[:8], "big") % max_days
