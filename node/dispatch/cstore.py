"""C-STORE SCU: one association per batch, proposing only the contexts the files need."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config

from node.config.schema import Destination
from node.config.tls import TlsError, client_context

# send_c_store(path) streams the file's data set as written, without pydicom decoding it and encoding it
# again: for a 300-slice SEG (over 500 per-frame items) that round trip cost about 0.8 s a send.
_config.STORE_SEND_CHUNKED_DATASET = True


class SendError(Exception):
    """The association could not be made; nothing in the batch was sent."""


@dataclass(frozen=True)
class Outgoing:
    sop_instance_uid: str
    sop_class_uid: str
    path: Path


class _RecordingSSLSocket(ssl.SSLSocket):
    """Keeps the connect/handshake error on its context: pynetdicom only logs it, SendError should say it."""

    def connect(self, addr):  # type: ignore[no-untyped-def]
        try:
            super().connect(addr)
        except OSError as exc:
            self.context.handshake_error = exc  # type: ignore[attr-defined]
            raise


def _tls_args(dest: Destination) -> tuple[ssl.SSLContext, str] | None:
    """A fresh context per association, so renewed certificate files are used without a restart."""
    if dest.tls is None:
        return None
    try:
        # The service made the paths absolute (with_resolved_tls); cwd only matters for direct callers.
        ctx = client_context(dest.tls, Path.cwd())
    except TlsError as exc:
        raise SendError(f"TLS toward {dest.ae_title}@{dest.host}:{dest.port}: tls.{exc.key}: {exc}") from None
    ctx.sslsocket_class = _RecordingSSLSocket
    return ctx, dest.host


def send_files(dest: Destination, calling_ae: str, files: Sequence[Outgoing]) -> dict[str, str | None]:
    """Send each file; return {sop_instance_uid: None on success, else the error}."""
    contexts: dict[str, set[str]] = {}
    for f in files:  # each file's SOP class and transfer syntax, from its file meta alone
        meta = read_file_meta_info(f.path)
        contexts.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(str(meta.TransferSyntaxUID))
    ae = AE(ae_title=dest.calling_ae_title or calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    tls_args = _tls_args(dest)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise SendError(f"association rejected by {dest.ae_title}@{dest.host}:{dest.port}")
        if tls_args and (err := getattr(tls_args[0], "handshake_error", None)) is not None:
            why = (f"certificate verify failed: {err.verify_message} (check tls.ca_file)"
                   if isinstance(err, ssl.SSLCertVerificationError) else getattr(err, "reason", None) or err)
            raise SendError(f"TLS connection to {dest.ae_title}@{dest.host}:{dest.port} failed: {why}")
        raise SendError(f"cannot connect to {dest.ae_title}@{dest.host}:{dest.port}"
                        + (" (TLS)" if tls_args else ""))
    results: dict[str, str | None] = {}
    try:
        for f in files:
            uid = f.sop_instance_uid
            try:
                status = assoc.send_c_store(Path(f.path))
            except (RuntimeError, ValueError, AttributeError) as exc:
                results[uid] = f"not sent: {exc}"
                continue
            code = getattr(status, "Status", None)
            if code is None:
                results[uid] = "no response (timeout or connection lost)"
            elif code in (0x0000, 0xB000, 0xB006, 0xB007):
                results[uid] = None
            else:
                results[uid] = f"{dest.ae_title} answered status 0x{code:04X}"
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return results
