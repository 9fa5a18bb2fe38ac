"""Client TLS contexts from config, with errors that name the file at fault."""

from __future__ import annotations

import ssl
from pathlib import Path

from .config import MllpTls
from .errors import RisSendError


def client_context(ca_file: Path | None = None, cert_file: Path | None = None,
                   key_file: Path | None = None) -> ssl.SSLContext:
    """A verifying client context (hostname checked): the given CA or the system CAs, and our cert if any."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise RisSendError(f"TLS CA file {ca_file} cannot be loaded ({exc}): check tls.ca_file", retryable=False) from exc
    if cert_file is not None:
        try:
            ctx.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise RisSendError(f"TLS client certificate {cert_file} / key {key_file} cannot be loaded ({exc}): "
                               f"check tls.cert_file and tls.key_file", retryable=False) from exc
    return ctx


def mllp_context(tls: MllpTls) -> ssl.SSLContext:
    return client_context(tls.ca_file, tls.cert_file, tls.key_file)
