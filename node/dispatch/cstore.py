"""C-STORE SCU: one association per batch, proposing only the contexts the files need."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from pydicom import dcmread
from pynetdicom import AE

from node.config.schema import Destination


class SendError(Exception):
    """The association could not be made; nothing in the batch was sent."""


@dataclass(frozen=True)
class Outgoing:
    sop_instance_uid: str
    sop_class_uid: str
    path: Path


def send_files(dest: Destination, calling_ae: str, files: Sequence[Outgoing]) -> dict[str, str | None]:
    """Send each file; return {sop_instance_uid: None on success, else the error}."""
    datasets = {f.sop_instance_uid: dcmread(f.path) for f in files}
    contexts: dict[str, set[str]] = {}
    for ds in datasets.values():
        contexts.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    ae = AE(ae_title=dest.calling_ae_title or calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = dest.timeout_s
    for sop_class, syntaxes in contexts.items():
        ae.add_requested_context(sop_class, sorted(syntaxes))
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        if assoc.is_rejected:
            raise SendError(f"association rejected by {dest.ae_title}@{dest.host}:{dest.port}")
        raise SendError(f"cannot connect to {dest.ae_title}@{dest.host}:{dest.port}")
    results: dict[str, str | None] = {}
    try:
        for uid, ds in datasets.items():
            try:
                status = assoc.send_c_store(ds)
            except (RuntimeError, ValueError) as exc:
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
