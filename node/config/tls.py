"""DICOM TLS settings (node.tls, destinations.<name>.tls) and the SSL contexts built from them.

File problems are found when the config is loaded (`tls_errors`, run by `ainode check-config` and
`ainode serve` before anything listens), each reported with its key path and the file at fault,
rather than as an opaque OpenSSL error at the first association.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from node.config.base import Strict

if TYPE_CHECKING:
    from node.config.schema import Destination, NodeConfig

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_FILES = ("cert_file", "key_file", "ca_file")


class TlsSettings(Strict):
    """One side of a DICOM TLS connection. Relative paths are relative to the config file's folder."""

    cert_file: Path | None = Field(
        None, description="PEM certificate (chain) we present. Required for node.tls; for a destination, "
        "only when that PACS asks for a client certificate.")
    key_file: Path | None = Field(
        None, description="PEM private key of cert_file, unencrypted (readable by the node's user only). "
        "Default: the key is in cert_file.")
    ca_file: Path | None = Field(
        None, description="PEM certificates of the CA(s) we trust for the peer. node.tls: the CA of the "
        "clients' certificates. Destination: the PACS's CA or its self-signed certificate; default: the "
        "system's CAs.")
    require_client_cert: bool = Field(
        False, description="node.tls only: refuse clients without a certificate signed by ca_file. When false, "
        "a client certificate is checked against ca_file only if ca_file is given.")
    verify_hostname: bool = Field(
        False, description="Destinations only: also require the PACS's certificate to name the destination's "
        "host. Off by default: PACS are usually addressed by IP address while their certificates name a "
        "DNS or device name, so checking the name would refuse correct peers; the certificate is still "
        "verified against ca_file.")
    min_version: Literal["TLSv1.2", "TLSv1.3"] = Field(
        "TLSv1.2", description="Oldest TLS version accepted (BCP 195: 1.2 or newer).")

    @model_validator(mode="after")
    def _consistent(self) -> "TlsSettings":
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not: give the certificate of that key")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file: the CA that signed the client certificates")
        return self

    def resolved(self, base: Path) -> "TlsSettings":
        """The same settings with relative file paths made absolute against `base` (the config's folder)."""
        update = {k: base / p for k in _FILES if (p := getattr(self, k)) is not None and not p.is_absolute()}
        return self.model_copy(update=update)


class TlsError(ValueError):
    """A TLS file that cannot be used; `key` is the setting at fault (cert_file, key_file, ca_file)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def config_dir(source: str) -> Path:
    """The folder relative paths in the config are resolved against (LoadedConfig.source)."""
    return Path.cwd() if source.startswith("<") else Path(source).resolve().parent


def _readable(key: str, path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise TlsError(key, f"file not found: {path}") from None
    except IsADirectoryError:
        raise TlsError(key, f"{path} is a folder, not a PEM file") from None
    except PermissionError:
        raise TlsError(key, f"cannot read {path}: permission denied (give the node's user read access)") from None


def _no_password() -> bytes:
    raise TlsError("key_file", "")  # message filled in by _load_chain, which knows the file


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    key = key or cert
    _readable("cert_file", cert)
    _readable("key_file", key)
    try:  # is there a certificate at all? (load_cert_chain's own error does not say which file is bad)
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(cert))
    except ssl.SSLError:
        raise TlsError("cert_file", f"{cert} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    try:
        ctx.load_cert_chain(str(cert), str(key), password=_no_password)
    except TlsError:
        raise TlsError("key_file", f"{key} is an encrypted private key: the node cannot prompt for a password; "
                       "store it unencrypted (openssl pkey -in IN -out OUT), readable by the node's user only") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsError("key_file", f"{key} is not the private key of {cert}: give the key the certificate "
                           "was issued for") from None
        raise TlsError("key_file", f"{key} holds no usable PEM private key ({exc.reason or exc})") from None


def _load_ca(ctx: ssl.SSLContext, ca: Path) -> None:
    _readable("ca_file", ca)
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError:
        raise TlsError("ca_file", f"{ca} holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def server_context(tls: TlsSettings, base: Path) -> ssl.SSLContext:
    """The SCP's context. Raises TlsError naming the file at fault."""
    tls = tls.resolved(base)
    if tls.cert_file is None:
        raise TlsError("cert_file", "the node's TLS listener needs cert_file (and key_file): its certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    _load_chain(ctx, tls.cert_file, tls.key_file)
    if tls.ca_file is not None:
        _load_ca(ctx, tls.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_context(tls: TlsSettings, base: Path) -> ssl.SSLContext:
    """The SCU's context toward one destination. Raises TlsError naming the file at fault."""
    tls = tls.resolved(base)
    return client_context_for(tls.ca_file, tls.cert_file, tls.key_file, verify_hostname=tls.verify_hostname,
                              min_version=tls.min_version)


def client_context_for(ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None, *,
                       verify_hostname: bool = True, min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A client context that always verifies the server's chain (against `ca_file`, else the system CAs),
    with our certificate when one is given. Shared by DICOM, MLLP, syslog and HTTPS clients; raises
    TlsError whose `key` names the setting at fault (ca_file, cert_file, key_file)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.check_hostname = verify_hostname
    if ca_file is not None:
        _load_ca(ctx, ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None:
        _load_chain(ctx, cert_file, key_file)
    return ctx


def with_resolved_tls(destinations: dict[str, "Destination"], base: Path) -> dict[str, "Destination"]:
    """Destinations whose TLS file paths are absolute, so the dispatcher need not know the config's folder."""
    return {name: d if d.tls is None else d.model_copy(update={"tls": d.tls.resolved(base)})
            for name, d in destinations.items()}


def tls_errors(cfg: "NodeConfig", base: Path) -> list[str]:
    """Every TLS problem in the config as 'key.path: message', by building each context once."""
    errors: list[str] = []
    checks: list[tuple[str, TlsSettings, bool]] = []
    if cfg.node.tls is not None:
        checks.append(("node.tls", cfg.node.tls, True))
        if cfg.node.tls.verify_hostname:
            errors.append("node.tls.verify_hostname: applies to destinations only (the node does not check "
                          "client host names); remove it")
    for name, dest in cfg.destinations.items():
        if dest.tls is not None:
            checks.append((f"destinations.{name}.tls", dest.tls, False))
            if dest.tls.require_client_cert:
                errors.append(f"destinations.{name}.tls.require_client_cert: applies to node.tls only "
                              "(whether a PACS wants our certificate is its own setting); remove it")
    for prefix, tls, server in checks:
        try:
            (server_context if server else client_context)(tls, base)
        except TlsError as exc:
            errors.append(f"{prefix}.{exc.key}: {exc}")
    return errors
