"""The `api:` config section: where the HTTP API listens and who may use it (tokens, basic auth, roles)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from node.config.base import Strict

Role = Literal["admin", "viewer"]


class _Secret(Strict):
    """A secret comes from an environment variable or a file, never from the config file itself."""

    role: Role = "viewer"

    def _check_one(self, env: str | None, file: Path | None, what: str) -> None:
        if (env is None) == (file is None):
            raise ValueError(f"give exactly one of {what}_env or {what}_file")


class ApiToken(_Secret):
    name: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$", description="Who uses the token (audited as user).")
    token_env: str | None = Field(None, description="Environment variable holding the bearer token.")
    token_file: Path | None = Field(None, description="File holding the token (relative: to the config file).")

    @model_validator(mode="after")
    def _one_source(self) -> "ApiToken":
        self._check_one(self.token_env, self.token_file, "token")
        return self


class ApiBasicUser(_Secret):
    user: str = Field(pattern=r"^[A-Za-z0-9_.@-]{1,64}$")
    password_env: str | None = Field(None, description="Environment variable holding the password.")
    password_file: Path | None = Field(None, description="File holding the password (relative: to the config file).")

    @model_validator(mode="after")
    def _one_source(self) -> "ApiBasicUser":
        self._check_one(self.password_env, self.password_file, "password")
        return self


class ApiSection(Strict):
    host: str = Field("127.0.0.1", description="Address of the HTTP API, the IT page and /metrics.")
    port: int = Field(8780, ge=1, le=65535)
    tokens: list[ApiToken] = Field(default_factory=list, description="Bearer tokens (Authorization: Bearer ...).")
    basic: list[ApiBasicUser] = Field(default_factory=list, description="HTTP basic-auth users (the IT page).")

    @model_validator(mode="after")
    def _someone(self) -> "ApiSection":
        if not self.tokens and not self.basic:
            raise ValueError("api: configure at least one entry in tokens or basic; every request needs one")
        names = [t.name for t in self.tokens] + [b.user for b in self.basic]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"api: user names must be unique (audited as the user): {', '.join(dup)}")
        return self
