"""Wire the audit log to an ATNA audit record repository: record → PS3.15 XML → RFC 5424 syslog.

    forwarder = build_atna_forwarder(cfg.atna, node_ae=cfg.node.ae_title, base=config_dir,
                                     patient_lookup=...)
    audit.add_listener(forwarder)      # after each durable append, off the caller's critical path
    ...
    forwarder.close(timeout_s=5)       # after the last append (node-stop), before the store closes
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.audit.atna import AtnaMapper
from node.audit.atna_config import AtnaSection
from node.audit.syslog import SyslogForwarder
from node.config.tls import TlsError, client_context_for

log = logging.getLogger("ainode.atna")


class AtnaConfigError(ValueError):
    """An `atna:` setting that cannot be used; `key` is the setting at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"atna.{key}: {message}")
        self.key = key


def tls_context(section: AtnaSection) -> ssl.SSLContext:
    """The client context toward the receiver (TLS 1.2 or newer). Raises AtnaConfigError naming the file."""
    try:
        return client_context_for(section.ca_file, section.cert_file, section.key_file,
                                  verify_hostname=section.verify_hostname)
    except TlsError as exc:
        raise AtnaConfigError(exc.key, str(exc)) from None


class AtnaForwarder:
    """An AuditLog listener: queues each forwarded record; mapping and sending run on the sender thread.

    Records of events that are never sent (atna.NOT_FORWARDED, unknown) do not take a queue slot.
    """

    def __init__(self, mapper: AtnaMapper, sender: SyslogForwarder[dict[str, Any]]) -> None:
        self.mapper = mapper
        self.sender = sender

    def __call__(self, record: dict[str, Any]) -> None:
        if self.mapper.forwards(record.get("event")):
            self.sender.submit(record)

    def flush(self, timeout_s: float) -> bool:
        return self.sender.flush(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        self.sender.close(timeout_s)

    @property
    def stats(self) -> dict[str, int]:
        s = self.sender
        return {"sent": s.sent, "dropped": s.dropped, "skipped": s.skipped}


def build_atna_forwarder(section: AtnaSection, *, node_ae: str, base: Path | None = None,
                         patient_lookup: Callable[[str], str | None] | None = None,
                         hostname: str | None = None) -> AtnaForwarder | None:
    """The forwarder for `section`, or None when it is disabled. Raises AtnaConfigError for unusable files.

    `base` resolves relative file paths (the config file's folder). `patient_lookup(study_uid)` fills
    in the Patient object for records that carry only a study (e.g. from the store's studies table).
    """
    if not section.enabled:
        return None
    if base is not None:
        section = section.resolved(base)
    ctx = tls_context(section) if section.transport == "tls" else None
    mapper = AtnaMapper(audit_source_id=section.source_id(node_ae), enterprise_site_id=section.enterprise_site_id,
                        node_host=hostname, patient_lookup=patient_lookup)
    sender: SyslogForwarder[dict[str, Any]] = SyslogForwarder(
        section.host, section.resolved_port, render=mapper.to_xml, ssl_context=ctx, app_name=section.app_name,
        hostname=hostname, bom=section.include_bom, queue_size=section.queue_size, name="atna-syslog")
    log.info("ATNA audit messages go to %s:%d over %s", section.host, section.resolved_port, section.transport)
    return AtnaForwarder(mapper, sender)
