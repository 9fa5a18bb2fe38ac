"""Who is calling: bearer tokens and basic-auth users from the `api:` section, each with a role."""

from __future__ import annotations

import base64
import binascii
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from node.api.config import ApiSection


class ApiConfigError(ValueError):
    """A secret of the api: section cannot be read; the message names the key and what to do."""


@dataclass(frozen=True)
class Principal:
    user: str
    role: str  # "admin" | "viewer"


@dataclass(frozen=True)
class Attempt:
    """The outcome of checking a request's credentials; `user` is the name tried (for the audit), if any."""

    principal: Principal | None
    user: str | None = None


def _read_secret(env: str | None, file: Path | None, key: str, base: Path) -> str:
    if env is not None:
        value = os.environ.get(env, "")
        if not value:
            raise ApiConfigError(f"{key}_env: environment variable {env} is not set or empty; set it before starting")
        return value
    path = file if file.is_absolute() else base / file  # type: ignore[union-attr]
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ApiConfigError(f"{key}_file: cannot read {path}: {exc.strerror}") from exc
    if not value:
        raise ApiConfigError(f"{key}_file: {path} is empty")
    return value


class Authenticator:
    """Secrets are read once at start-up; comparisons are constant-time."""

    def __init__(self, section: ApiSection, base: Path) -> None:
        self._tokens = [(_read_secret(t.token_env, t.token_file, f"api.tokens[{i}].token", base),
                         Principal(t.name, t.role)) for i, t in enumerate(section.tokens)]
        self._basic = {b.user: (_read_secret(b.password_env, b.password_file, f"api.basic[{i}].password", base),
                                Principal(b.user, b.role)) for i, b in enumerate(section.basic)}

    def check(self, authorization: str | None) -> Attempt:
        if not authorization:
            return Attempt(None)
        scheme, _, value = authorization.partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            found = None
            for secret, principal in self._tokens:  # compare against all: timing says nothing about which
                if hmac.compare_digest(secret.encode(), value.encode()):
                    found = principal
            return Attempt(found, found.user if found else None)
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return Attempt(None)
            entry = self._basic.get(user)
            ok = entry is not None and hmac.compare_digest(entry[0].encode(), password.encode())
            return Attempt(entry[1] if ok else None, user[:64] if entry is not None else None)
        return Attempt(None)
