"""Config model for a PACS reached by DICOMweb STOW-RS instead of C-STORE.

Retry field names match `node.config.schema.Destination` (max_attempts, backoff_initial_s, backoff_max_s),
so the dispatcher's backoff applies unchanged. Secrets are never in the config itself: the password or
token comes from an environment variable or a file (read at each send, so a rotated file needs no restart).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from node.config.base import RetryPolicy


class DicomWebDestination(RetryPolicy):
    """A DICOMweb origin server; each batch of result files is one POST to {url}/studies."""

    url: str = Field(description="DICOMweb base URL (service root), e.g. https://pacs.example.org/dicom-web; "
                                 "the node POSTs to {url}/studies.")
    username: str | None = Field(None, description="HTTP basic auth user; the password from password_env or "
                                                   "password_file.")
    password_env: str | None = Field(None, description="Environment variable holding the basic auth password.")
    password_file: Path | None = Field(None, description="File holding the basic auth password; read at each send.")
    token_env: str | None = Field(None, description="Environment variable holding a bearer token.")
    token_file: Path | None = Field(None, description="File holding a bearer token; read at each send.")
    ca_file: Path | None = Field(None, description="PEM CA bundle for an https url. Default: the system CAs.")
    timeout_s: float = Field(30.0, gt=0, description="For connecting, and again for each read of the answer.")
    max_batch_mb: float = Field(50.0, gt=0, description="Most file data in one POST; more files make more POSTs "
                                                        "(a single larger file goes alone).")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"'{value}' is not an http:// or https:// URL")
        if parts.username is not None or parts.password is not None:
            # Credentials in the URL would end up in logs and error messages.
            raise ValueError("no user or password in the URL: use username with password_env/password_file, "
                             "or token_env/token_file")
        if parts.query or parts.fragment:
            raise ValueError(f"'{value}' has a query or fragment; give the DICOMweb base URL only")
        value = value.rstrip("/")
        if value.endswith("/studies"):
            raise ValueError(f"'{value}' ends in /studies; give the DICOMweb base (the node adds /studies)")
        return value

    @field_validator("password_env", "token_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and (not value or "=" in value or "\0" in value):
            raise ValueError(f"'{value}' is not an environment variable name")
        return value

    @model_validator(mode="after")
    def _auth(self) -> "DicomWebDestination":
        if self.password_env is not None and self.password_file is not None:
            raise ValueError("give password_env or password_file, not both")
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("give token_env or token_file, not both")
        has_password = self.password_env is not None or self.password_file is not None
        has_token = self.token_env is not None or self.token_file is not None
        if has_password and self.username is None:
            raise ValueError("password_env/password_file need username")
        if self.username is not None and not has_password:
            raise ValueError("username needs password_env or password_file")
        if self.username is not None and has_token:
            raise ValueError("give basic auth (username + password_*) or a bearer token (token_*), not both")
        if self.ca_file is not None and not self.url.startswith("https://"):
            raise ValueError("ca_file is for an https:// url")
        return self

    @property
    def stow_url(self) -> str:
        return f"{self.url}/studies"

    def with_resolved_paths(self, base: Path) -> "DicomWebDestination":
        """This destination with relative file paths made relative to `base` (the config file's folder)."""

        def fix(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else base / p

        return self.model_copy(update={k: fix(getattr(self, k)) for k in ("password_file", "token_file", "ca_file")})
