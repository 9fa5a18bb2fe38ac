"""Client TLS contexts from config, with errors that name the file at fault."""

from __future__ import annotations

import ssl
from pathlib import Path

from node.config.tls import TlsError, client_context_for

from .config import MllpTls
from .errors import RisSendError


def client_context(ca_file: Path | None = None, cert_file: Path | None = None,
                   key_file: Path | None = None) -> ssl.SSLContext:
    """A verifying client context (hostname checked): the given CA or the system CAs, and our cert if any."""
    try:
        return client_context_for(ca_file, cert_file, key_file, verify_hostname=True)
    except TlsError as exc:
        raise RisSendError(f"TLS {exc} (check tls.{exc.key})", retryable=False) from exc


def mllp_context(tls: MllpTls) -> ssl.SSLContext:
    return client_context(tls.ca_file, tls.cert_file, tls.key_file)
