"""Config models for RIS destinations: HL7 v2 over MLLP, and FHIR R4.

Field names for retries match `node.config.schema.Destination` (max_attempts, backoff_initial_s,
backoff_max_s), so the dispatcher's backoff applies to these destinations unchanged. Each send is a
single attempt; retrying is the dispatcher's job, since only it persists the attempt count.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from node.config.base import RetryPolicy, Strict

# MSH-3..6 namespace ids: HL7 delimiters would have to be escaped there, which receivers rarely expect.
HL7_NAME = r"^[^|^~\\&\r\n]{0,180}$"


class MllpTls(Strict):
    ca_file: Path | None = Field(
        None, description="PEM bundle of the CA(s) that signed the RIS's certificate. Default: the system CAs.")
    cert_file: Path | None = Field(None, description="Our client certificate (PEM), for a RIS that checks clients.")
    key_file: Path | None = Field(None, description="The private key of cert_file (PEM).")

    @model_validator(mode="after")
    def _pair(self) -> "MllpTls":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together: give both or neither")
        return self


class RisDestination(RetryPolicy):
    """A RIS (or interface engine) that takes HL7 v2.5 ORU^R01 over MLLP."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    sending_application: str = Field("AINODE", pattern=HL7_NAME, description="MSH-3")
    sending_facility: str = Field("", pattern=HL7_NAME, description="MSH-4")
    receiving_application: str = Field("", pattern=HL7_NAME, description="MSH-5")
    receiving_facility: str = Field("", pattern=HL7_NAME, description="MSH-6")
    timeout_s: float = Field(30.0, gt=0, description="For connecting, and again for the ACK after sending.")
    tls: MllpTls | None = Field(None, description="Absent: plain TCP.")


class FhirDestination(RetryPolicy):
    """A FHIR R4 server that takes a transaction Bundle (DiagnosticReport + Observations) at its base URL."""

    base_url: str = Field(description="e.g. https://fhir.example.org/fhir (the Bundle is POSTed here)")
    token: SecretStr | None = Field(None, description="Bearer token. Prefer token_file or token_env.")
    token_file: Path | None = Field(None, description="File holding the bearer token; read at each send.")
    token_env: str | None = Field(None, description="Environment variable holding the bearer token.")
    timeout_s: float = Field(30.0, gt=0)
    ca_file: Path | None = Field(None, description="PEM CA bundle for an https base_url. Default: system CAs.")

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"'{value}' is not an http:// or https:// URL")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_token(self) -> "FhirDestination":
        given = [n for n in ("token", "token_file", "token_env") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"give at most one of token, token_file, token_env (got {', '.join(given)})")
        return self


def resolve_paths(dest: RisDestination | FhirDestination, base: Path) -> RisDestination | FhirDestination:
    """`dest` with its relative file paths made relative to `base` (the config file's folder)."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else base / p

    if isinstance(dest, RisDestination):
        if dest.tls is None:
            return dest
        tls = dest.tls.model_copy(update={k: fix(getattr(dest.tls, k)) for k in ("ca_file", "cert_file", "key_file")})
        return dest.model_copy(update={"tls": tls})
    return dest.model_copy(update={"ca_file": fix(dest.ca_file), "token_file": fix(dest.token_file)})
