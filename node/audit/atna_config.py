"""The `atna:` config section: where audit records go as DICOM PS3.15 A.5 messages over syslog.

Relative file paths are relative to the config file's folder (`resolved(base)`); whether the files
can be used is checked when the forwarder is built (`node.audit.forward.tls_context`), with the
setting and the file named in the error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from node.config.base import Strict

TLS_PORT = 6514  # RFC 5425
_FILES = ("ca_file", "cert_file", "key_file")


def _header_token(value: str, max_len: int, key: str) -> str:
    """RFC 5424 header fields are 1..max_len printable US-ASCII characters without spaces."""
    if not value or len(value) > max_len or any(not 33 <= ord(c) <= 126 for c in value):
        raise ValueError(f"{key} '{value}' must be 1-{max_len} printable ASCII characters without spaces "
                         "(it goes into the RFC 5424 syslog header)")
    return value


class AtnaSection(Strict):
    """Send every audit record the node writes as an IHE ATNA / DICOM PS3.15 A.5 audit message."""

    enabled: bool = Field(True, description="false: keep the settings but send nothing.")
    host: str = Field(min_length=1, description="The audit record repository (syslog receiver).")
    port: int | None = Field(
        None, ge=1, le=65535,
        description="Default 6514 for tls (RFC 5425). Plain tcp has no standard port: set it (often 514 or 601).")
    transport: Literal["tcp", "tls"] = Field(
        "tls", description="tls: RFC 5425 (IHE ATNA requires it between secure nodes); tcp: RFC 6587, "
        "only on a trusted network.")
    ca_file: Path | None = Field(
        None, description="PEM CA certificate(s) that signed the receiver's certificate. Default: the system's CAs.")
    cert_file: Path | None = Field(
        None, description="PEM certificate the node presents (mutual TLS, as IHE ATNA asks). With key_file.")
    key_file: Path | None = Field(None, description="Unencrypted PEM private key of cert_file.")
    verify_hostname: bool = Field(
        True, description="Require the receiver's certificate to name `host` (RFC 5425 5.2). Turn off only "
        "when the receiver is addressed by an IP its certificate does not carry.")
    app_name: str = Field("ainode", description="RFC 5424 APP-NAME.")
    audit_source_id: str | None = Field(
        None, description="AuditSourceIdentification/@AuditSourceID. Default: node.ae_title.")
    enterprise_site_id: str | None = Field(
        None, description="AuditSourceIdentification/@AuditEnterpriseSiteID, e.g. the hospital's name or OID.")
    include_bom: bool = Field(
        True, description="Start the XML with a UTF-8 BOM, as RFC 5424 asks for UTF-8 text. Turn off only for a "
        "repository that cannot parse it.")
    queue_size: int = Field(
        10000, ge=1, le=1_000_000,
        description="Messages held while the receiver is unreachable; beyond this, new ones are dropped "
        "(counted in the log; the local audit log keeps every record).")

    @field_validator("app_name")
    @classmethod
    def _check_app_name(cls, value: str) -> str:
        return _header_token(value, 48, "app_name")

    @field_validator("audit_source_id", "enterprise_site_id")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be blank: leave it out for the default")
        return None if value is None else value.strip()

    @model_validator(mode="after")
    def _consistent(self) -> "AtnaSection":
        if self.transport == "tcp":
            given = [k for k in _FILES if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} set but transport is tcp: set transport: tls, "
                                 "or remove the TLS files")
            if self.port is None:
                raise ValueError("transport tcp needs port: plain syslog over TCP has no standard port "
                                 "(ask the receiver's administrator; often 514 or 601)")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both (mutual TLS) or neither")
        return self

    @property
    def resolved_port(self) -> int:
        return self.port if self.port is not None else TLS_PORT

    def source_id(self, node_ae: str) -> str:
        return self.audit_source_id or node_ae

    def resolved(self, base: Path) -> "AtnaSection":
        """The same settings with relative file paths made absolute against `base` (the config's folder)."""
        update = {k: base / p for k in _FILES if (p := getattr(self, k)) is not None and not p.is_absolute()}
        return self.model_copy(update=update)
