"""Config of de-identification for destinations marked external (a cloud second-read service).

    deid:
      key_env: AINODE_DEID_KEY          # or key_file: /etc/ainode/deid.key (at least 32 bytes)
      retain_uids: false                # true: PS3.15 Retain UIDs Option (113110)
      retain_dates: false               # true: Retain Longitudinal Full Dates Option (113106)
      shift_dates: true                 # with retain_dates false: Modified Dates Option (113107)
      remove_private_tags: true
      safe_private: []                  # e.g. [{creator: "GEMS_PARM_01", group: 0x0043, element: 0x27}]
      patient_id_prefix: "AINODE-"

The key makes pseudonyms unguessable without it and stable with it (a series keeps one series UID,
a patient one pseudonym, across sends). It is read from a file or the environment, never from the
YAML, and never logged.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, model_validator

from node.config.base import Strict

MIN_KEY_BYTES = 32


class DeidKeyError(RuntimeError):
    """The pseudonym key is missing or too short (the message names the file or variable, not the key)."""


class SafePrivateTag(Strict):
    """A private element known to hold no identity (Retain Safe Private Option), kept when private tags go."""

    creator: str = Field(min_length=1, description="Private Creator value, e.g. GEMS_PARM_01")
    group: int = Field(ge=0x0009, le=0xFFFF, description="odd group number, e.g. 0x0043")
    element: int = Field(ge=0x00, le=0xFF, description="element offset within the creator's block, e.g. 0x27")

    @model_validator(mode="after")
    def _odd(self) -> "SafePrivateTag":
        if self.group % 2 == 0:
            raise ValueError(f"group {self.group:#06x} is even: private groups are odd")
        return self


class DeidSettings(Strict):
    """How copies for external destinations are de-identified (PS3.15 E.1 Basic Profile + options)."""

    key_file: Path | None = Field(None, description="File holding the pseudonym key (>= 32 bytes; keep it 0600).")
    key_env: str | None = Field(None, description="Environment variable holding the pseudonym key.")
    retain_uids: bool = Field(False, description="Retain UIDs Option: keep original UIDs (else keyed 2.25 UIDs).")
    retain_dates: bool = Field(False, description="Retain Longitudinal Temporal Information Full Dates Option.")
    shift_dates: bool = Field(
        True, description="With retain_dates false: shift every date by a keyed per-patient number of days "
                          "(Modified Dates Option), so intervals survive; false: dates emptied/removed per Table E.1-1.")
    max_date_shift_days: int = Field(3650, ge=1, le=36500, description="Dates move back 1..N days.")
    retain_patient_characteristics: bool = Field(
        False, description="Retain Patient Characteristics Option: keep sex, age, size, weight.")
    remove_private_tags: bool = Field(True, description="false keeps every private tag: not Basic Profile conformant.")
    safe_private: tuple[SafePrivateTag, ...] = Field((), description="Private tags kept although private tags go.")
    patient_id_prefix: str = Field("AINODE-", max_length=32, pattern=r"^[A-Za-z0-9._-]*$")

    @model_validator(mode="after")
    def _one_key_source(self) -> "DeidSettings":
        given = [n for n in ("key_file", "key_env") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of key_file, key_env (the secret for keyed pseudonyms)")
        return self


def load_key(settings: DeidSettings) -> bytes:
    """The pseudonym key from the configured file or environment variable."""
    if settings.key_env is not None:
        value = os.environ.get(settings.key_env)
        if not value:
            raise DeidKeyError(f"deid.key_env {settings.key_env} is not set in the node's environment: "
                               f"set it to a random secret of at least {MIN_KEY_BYTES} bytes")
        key, where = value.strip().encode(), f"environment variable {settings.key_env}"
    else:
        assert settings.key_file is not None
        try:
            key = settings.key_file.read_bytes().strip()
        except OSError as exc:
            raise DeidKeyError(f"deid.key_file {settings.key_file} cannot be read ({exc.strerror}): "
                               f"create it, e.g. head -c 48 /dev/urandom | base64 > {settings.key_file}") from None
        where = f"deid.key_file {settings.key_file}"
    if len(key) < MIN_KEY_BYTES:
        raise DeidKeyError(f"{where} holds {len(key)} bytes; a pseudonym key needs at least {MIN_KEY_BYTES} "
                           f"(e.g. head -c 48 /dev/urandom | base64)")
    return key
