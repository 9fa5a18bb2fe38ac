"""The C-STORE / C-ECHO SCP.

The association thread does only what Success promises: a durable spool write
and a store row. Everything else happens later in the assembler and workers.
"""

from __future__ import annotations

import errno
import functools
import gc
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    UID,
)
from pynetdicom import AE, evt
from pynetdicom import sop_class as sc
from pynetdicom.association import Association
from pynetdicom.transport import ThreadedAssociationServer

from node.audit import AuditLog
from node.config.schema import NodeSection
from node.dispatch.commitment import STORAGE_COMMITMENT, record_report
from node.receive import checks, dimse_uids, dul_io, dul_store, p_data, store_request, store_response
from node.receive.accept_turns import AcceptTurns, turn_taking
from node.receive.group_commit import GroupCommit
from node.receive.spill import SpillFile
from node.receive.spool import Spool
from node.receive.header import instance_meta
from node.receive.part10 import part10_prefix, read_header
from node.store import Store
from node.store.db import InstanceMeta

log = logging.getLogger("ainode.receive")

store_response.install()  # C-STORE-RSP Success encoded directly (store_response.py says why)
dul_io.install()  # no 1 ms polls, whole-PDU reads (dul_io.py says why)
p_data.install()  # P-DATA-TF straight to DIMSE (p_data.py says why)
dimse_uids.install()  # each UID validated once, not at every primitive (dimse_uids.py says why)
store_request.install()  # C-STORE-RQ primitives from the command set's bytes (store_request.py says why)
dul_store.install()  # C-STORE served on the DUL thread that read it (dul_store.py says why)

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1,
    JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless,
]

STORAGE_CLASSES = [
    # CT, MR
    sc.CTImageStorage, sc.EnhancedCTImageStorage, sc.MRImageStorage, sc.EnhancedMRImageStorage,
    # CR / DX
    sc.ComputedRadiographyImageStorage, sc.DigitalXRayImageStorageForPresentation,
    sc.DigitalXRayImageStorageForProcessing,
    # MG
    sc.DigitalMammographyXRayImageStorageForPresentation, sc.DigitalMammographyXRayImageStorageForProcessing,
    sc.BreastTomosynthesisImageStorage,
    # US
    sc.UltrasoundImageStorage, sc.UltrasoundMultiFrameImageStorage,
    # SC
    sc.SecondaryCaptureImageStorage, sc.MultiFrameSingleBitSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    # SEG, SR
    sc.SegmentationStorage,
    sc.BasicTextSRStorage, sc.EnhancedSRStorage, sc.ComprehensiveSRStorage, sc.Comprehensive3DSRStorage,
]


class TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's server, with the TLS handshake moved into each connection's own thread.

    pynetdicom handshakes in `get_request`, on the one thread that accepts every connection: a peer that
    connects and stays silent (a port check, a stalled client) would hold up all others, and a failed
    handshake is dropped there without a word. Here it is bounded by `handshake_timeout` and reported.
    """

    handshake_timeout: float = 10.0
    on_handshake_failed: Callable[[tuple[str, int], OSError], None] = staticmethod(lambda addr, exc: None)

    def get_request(self):  # type: ignore[no-untyped-def]
        return self.socket.accept()  # type: ignore[union-attr]

    def process_request_thread(self, request, client_address):  # type: ignore[no-untyped-def]
        assert self.ssl_context is not None
        try:
            timeout = request.gettimeout()
            request.settimeout(self.handshake_timeout)
            tls = self.ssl_context.wrap_socket(request, server_side=True)
            tls.settimeout(timeout)
        except OSError as exc:  # ssl.SSLError, timeout, reset
            request.close()
            self.on_handshake_failed(client_address, exc)
            return
        super().process_request_thread(tls, client_address)


def tls_peer(assoc) -> tuple[str | None, str | None]:  # type: ignore[no-untyped-def]
    """(TLS version, peer certificate subject as 'CN=…,O=…') of an association; (None, None) without TLS."""
    sock = dul_io.os_socket(assoc)
    if not isinstance(sock, ssl.SSLSocket):
        return None, None
    cert = sock.getpeercert() or {}
    names = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C",
             "localityName": "L", "stateOrProvinceName": "ST"}
    subject = ",".join(f"{names.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
    return sock.version(), subject or None


# DIMSE C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
DATA_SET_MISMATCH = 0xA900


MAX_PDU_BYTES = 4 * 1024 * 1024  # the largest P-DATA PDU the node accepts (A-ASSOCIATE-AC)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class AuditAppendFailed(RuntimeError):
    """The instance's row is committed but its audit record could not be written."""


@dataclass
class ReceiveCounters:
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes: int = 0


ENDED_JOIN_S = 30.0  # after a close without release, how long _warn_if_not_released waits for the thread to end
MAX_REFUSALS_LOGGED = 1024  # (calling AE, refused set) pairs remembered for _log_refused; past it, each is warned


def _released(assoc: Association) -> bool:
    """The association was released, or is closing after this node answered the sender's A-RELEASE-RQ (an
    acceptor waits in pynetdicom's Sta13 for the peer's close after its A-RELEASE-RP). An A-ABORT or
    A-ASSOCIATE-RJ this node sent also leads to Sta13; is_aborted / is_rejected tell them apart once
    pynetdicom has set them, and a hint that slips through only has the node ask the PACS for counts early."""
    if assoc.is_released:
        return True
    return assoc.dul.state_machine.current_state == "Sta13" and not assoc.is_aborted and not assoc.is_rejected


class StoreSCP:
    def __init__(self, cfg: NodeSection, spool: Spool, store: Store, audit: AuditLog, *, min_free_mb: int = 0,
                 ssl_context: ssl.SSLContext | None = None, returns=None,  # type: ignore[no-untyped-def]
                 index: GroupCommit | None = None, committer=None, turns: AcceptTurns | None = None,
                 established_elsewhere: Callable[[], int] | None = None) -> None:
        """`index`, `committer`, `turns` and `established_elsewhere` are for node.receive_processes > 1:
        a receive process indexes and audits through the node process, takes turns with the others to
        accept on the port (node/receive/accept_turns.py), and counts the associations the other processes
        hold against node.max_associations."""
        self.cfg = cfg
        self.max_data_set_bytes = int(cfg.max_dataset_mb * 1024 * 1024)
        self.receive_to_disk_bytes = int(cfg.receive_to_disk_mb * 1024 * 1024)
        self.returns = returns  # node.deid.returns.ReturnedResults: results an external service sends back
        self.ssl_context = ssl_context  # from node.tls (node.config.tls.server_context); None: plain TCP
        self.min_free_bytes = min_free_mb * 1024 * 1024
        self.spool = spool
        self.store = store
        self.index = index or GroupCommit(store)  # the associations' store rows, committed together
        self.committer = committer or self  # a receive process: the node process's StoreSCP (rpc proxy)
        self.turns = turns
        self.established_elsewhere = established_elsewhere
        self.audit = audit
        self.counters = ReceiveCounters()
        self._networks = [ipaddress.ip_network(n, strict=False) for n in cfg.allowed_ips]
        self._server: ThreadedAssociationServer | None = None
        self._port = cfg.port  # the bound port once started (differs when cfg.port is 0)
        self.ae = self._make_ae()
        # Headers are checked here while the association thread writes the instance's file (_on_store).
        self._checker = ThreadPoolExecutor(max_workers=max(2, cfg.max_associations),
                                           thread_name_prefix="store-check")
        # Called with the studies an association stored instances of, when its sender releases it
        # (node/assemble/assembler.py Assembler.sender_done).
        self.on_released: Callable[[set[str]], None] | None = None
        # Called with each new instance once it is indexed (node/run/worker.py WorkerPool.arrived: read ahead).
        self.on_indexed: Callable[[InstanceMeta], None] | None = None
        self._studies: dict[object, set[str]] = {}  # association -> studies it stored instances of
        self._studies_lock = threading.Lock()
        # Open associations this node accepted (weak: one closed before its EVT_ACCEPTED ran is not kept)
        self._accepted: weakref.WeakSet[Association] = weakref.WeakSet()
        self._refusals_logged: set[tuple[str, tuple[str, ...]]] = set()  # (calling AE, refused SOP classes)
        self._storing = 0  # C-STORE handlers running now, in every association of this process
        self._storing_lock = threading.Lock()

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.cfg.ae_title)
        # pynetdicom's own limit counts bare TCP connections that never asked for an association
        # (health checks, port scans) until the ACSE timeout; _on_requested enforces the configured limit
        # on established associations instead, so pynetdicom's is only a backstop.
        ae.maximum_associations = self.cfg.max_associations * 4
        ae.network_timeout = self.cfg.network_timeout_s
        ae.acse_timeout = min(self.cfg.network_timeout_s, 10.0)
        ae.dimse_timeout = self.cfg.network_timeout_s
        # Large PDUs (fewer of them: storescu sends 128 KB ones anyway), but not unlimited: each PDU is read
        # whole into memory, and without a limit pynetdicom sends a data set as one PDU of its full size.
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.ainode_new_data_set = self._new_data_set  # store_request.decode_msg
        ae.add_supported_context(sc.Verification)
        for uid in STORAGE_CLASSES:
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        # Storage commitment reports (N-EVENT-REPORT) from a PACS the node asked; the PACS proposes the
        # SCP role for itself (role selection), which leaves the node its SCU.
        ae.add_supported_context(STORAGE_COMMITMENT, [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                                 scu_role=False, scp_role=True)
        return ae

    def _new_data_set(self, sop_class: str | None, sop_instance: str | None,
                      transfer_syntax: str | None) -> store_request.CappedDataSet:
        """Where an arriving C-STORE data set goes: memory, or past node.receive_to_disk_mb a spool temp file
        that starts with the File Meta Information these request values give (node/receive/spill.py)."""
        def open_spill() -> SpillFile:
            return self._spill_file(part10_prefix(sop_class or "", sop_instance or "", str(transfer_syntax or "")))

        spill_at = self.receive_to_disk_bytes if transfer_syntax else None
        return store_request.CappedDataSet(self.max_data_set_bytes, spill_at, open_spill)

    def _spill_file(self, prefix: bytes = b"") -> SpillFile:
        """A spool temp file written as data arrives, that asks for room against storage.min_free_mb."""
        return SpillFile(*self.spool.open_spill(), prefix, self._reserve)

    def _room_for(self, size: int) -> tuple[bool, int]:
        """(whether `size` more bytes leave storage.min_free_mb free on the spool disk, bytes free before)."""
        free = self.spool.free_bytes(size, keep=self.min_free_bytes)
        return free - size >= self.min_free_bytes, free

    def _reserve(self, size: int) -> None:
        """Room for `size` more bytes of a spill file, or OSError: as storage.min_free_mb refuses a data set
        held in memory before its file is written, a spilled one is stopped before it takes that room."""
        if not self._room_for(size)[0]:
            raise OSError(errno.ENOSPC, "spool disk below storage.min_free_mb")

    # ---- lifecycle -----------------------------------------------------

    def start(self) -> None:
        # pynetdicom's server runs a full gc.collect() every 60th turn of its accept loop (every 30 s), for
        # association threads it found were not collected. The process's start-up objects (imports, the
        # store, the config: about 200,000) made each one take 120 ms holding the GIL, a stall for every
        # association. Frozen, they are left out of every collection; what is made later is still seen. The
        # collection first keeps start-up garbage out of the frozen set (it would never be freed).
        gc.collect()
        gc.freeze()
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_EVENT_REPORT, self._on_event_report),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        if self.ssl_context is None and self.turns is None:
            self._server = self.ae.start_server(
                (self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers
            )
        else:
            self._server = self._start_own_server(handlers)
        self._port = self._server.server_address[1]
        log.info("listening ae_title=%s host=%s port=%d tls=%s", self.cfg.ae_title, self.cfg.host, self.port,
                 "on" if self.ssl_context else "off")

    def _start_own_server(self, handlers: list) -> ThreadedAssociationServer:  # type: ignore[type-arg]
        """What AE.start_server(block=False) does, with our server class (TLS handshake, accepting in turns)."""
        cls: type[ThreadedAssociationServer] = (ThreadedAssociationServer if self.ssl_context is None
                                                else TlsAssociationServer)
        if self.turns is not None:
            cls = turn_taking(cls, self.turns)
        server = self.ae.make_server((self.cfg.host, self.cfg.port), ssl_context=self.ssl_context,
                                     evt_handlers=handlers, server_class=cls)
        if self.ssl_context is not None:
            server.handshake_timeout = self.ae.acse_timeout
            server.on_handshake_failed = self._on_handshake_failed
        threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
        self.ae._servers.append(server)  # as start_server does: server.shutdown() removes it from there
        return server

    @property
    def port(self) -> int:
        return self._port

    def listening_socket(self) -> socket.socket:
        """The started server's socket, for the receive processes to accept on too (accept_turns.py)."""
        assert self._server is not None and self._server.socket is not None, "StoreSCP.start() first"
        return self._server.socket

    def stop_accepting(self) -> None:
        """Close the listening socket; associations in progress run to their end."""
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()

    def _established(self) -> list:  # type: ignore[type-arg]
        """Acceptor associations past negotiation: the ones that can carry instances."""
        return [a for a in self.ae.active_associations if a.is_acceptor and a.is_established]

    def established_count(self) -> int:
        """Associations that can carry instances, in this process and (receive processes) the others."""
        elsewhere = self.established_elsewhere() if self.established_elsewhere else 0
        return len(self._established()) + elsewhere

    def wait_for_associations(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._established():
                return True
            time.sleep(0.05)
        return False

    def stop(self) -> None:
        self.stop_accepting()
        self.ae.shutdown()
        self._checker.shutdown(wait=True)

    # ---- association events -------------------------------------------

    def _peer(self, event: evt.Event) -> tuple[str, str, int]:
        rq = event.assoc.requestor
        ae_title = rq.primitive.calling_ae_title if rq.primitive else rq.ae_title
        return str(ae_title).strip(), rq.address, rq.port

    def _on_requested(self, event: evt.Event) -> None:
        calling, ip, port = self._peer(event)
        if self.cfg.allowed_calling_aes and calling not in self.cfg.allowed_calling_aes:
            reason = f"calling AE title '{calling}' is not in node.allowed_calling_aes"
            rsd = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
        elif self._networks and not self._ip_allowed(ip):
            reason = f"address {ip} is not in node.allowed_ips"
            rsd = (0x01, 0x01, 0x01)  # permanent, service user, no reason given
        elif (busy := self.established_count()) >= self.cfg.max_associations:
            reason = f"too many associations ({busy} open, node.max_associations = {self.cfg.max_associations})"
            rsd = (0x02, 0x03, 0x02)  # transient, local limit exceeded: try again later
        else:
            return
        log.warning("association rejected calling_ae=%s ip=%s reason=%s", calling, ip, reason)
        self.audit.append("association-rejected", "failure", calling_ae=calling, peer_ip=ip,
                          peer_port=port, reason=reason)
        event.assoc.acse.send_reject(*rsd)
        event.assoc.kill()  # as pynetdicom does after its own rejects: the A-ASSOCIATE-RJ goes out first

    def _ip_allowed(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self._networks)

    def _on_handshake_failed(self, address: tuple[str, int], exc: OSError) -> None:
        ip, port = address[0], address[1]
        if isinstance(exc, (ssl.SSLEOFError, ConnectionError)) or not str(exc):
            # closed before or during the handshake: port checks (and the test harness) do this all day
            log.debug("tls connection closed before the handshake ended ip=%s port=%d", ip, port)
            return
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        if detail := getattr(exc, "verify_message", None):
            reason = f"{reason} ({detail})"
        elif reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST"):
            reason = f"{reason} (not a TLS hello: is the peer configured for TLS?)"
        log.warning("tls handshake failed ip=%s port=%d reason=%s", ip, port, reason)
        self.audit.append("tls-handshake-failed", "failure", peer_ip=ip, peer_port=port, reason=str(reason))

    def _on_accepted(self, event: evt.Event) -> None:
        calling, ip, port = self._peer(event)
        refused = sorted({cx.abstract_syntax for cx in event.assoc.rejected_contexts})
        tls_version, peer_cert = tls_peer(event.assoc)
        if tls_version:
            log.info("tls association calling_ae=%s ip=%s version=%s peer_cert=%s", calling, ip, tls_version,
                     peer_cert or "none")
        self.audit.append("association-accepted", calling_ae=calling, peer_ip=ip, peer_port=port,
                          tls_version=tls_version, peer_cert_subject=peer_cert,
                          receiver_pid=os.getpid() if self.turns else None)  # which receive process
        with self._studies_lock:
            self._accepted.add(event.assoc)
        if refused:
            self.audit.append("presentation-context-refused", "failure", calling_ae=calling, peer_ip=ip,
                              peer_port=port, sop_classes=refused,
                              reason="SOP class / transfer syntax not supported by this node")
            self._log_refused(calling, refused)

    def _log_refused(self, calling: str, refused: list[str]) -> None:
        """A warning the first time a calling AE has these contexts refused (in this receive process), then
        debug: senders such as storescu propose every SOP class they know on every association, and a
        warning per association buried the log. The audit log keeps a record per association."""
        key = (calling, tuple(refused))
        first = key not in self._refusals_logged
        if first and len(self._refusals_logged) < MAX_REFUSALS_LOGGED:
            self._refusals_logged.add(key)
        once = " (logged once per calling AE and set of classes; every association is in the audit log)"
        log.log(logging.WARNING if first else logging.DEBUG, "presentation contexts refused calling_ae=%s "
                "sop_classes=%s%s", calling, ",".join(refused), once if first else "")

    def _on_rejected(self, event: evt.Event) -> None:
        # Rejections that pynetdicom makes itself (its backstop connection limit); ours in
        # _on_requested do not raise EVT_REJECTED.
        if event.assoc.acse.acceptor.primitive is None:
            return
        calling, ip, port = self._peer(event)
        self.audit.append("association-rejected", "failure", calling_ae=calling, peer_ip=ip, peer_port=port,
                          reason="too many pending connections (pynetdicom limit)")

    def _on_released(self, event: evt.Event) -> None:
        self._forget_studies(event.assoc, hint=True)

    def sender_released(self, studies: set[str]) -> None:
        """A receive process's sender released its association (node/receive/processes.py): as _on_released."""
        if self.on_released is not None:
            self.on_released(set(studies))

    def _on_closed(self, event: evt.Event) -> None:
        """Aborted or dropped: the sender will send again, no hint. Closed after a release: the hint is passed
        here if EVT_RELEASED has not passed it yet. The A-RELEASE-RP wakes the peer, whose close the DUL
        thread can handle before the association thread raises EVT_RELEASED; the pop under the lock makes
        whichever comes first pass it, once. A data set cut off mid-way by the close loses its spill file
        here, not whenever the association's objects are collected."""
        released = _released(event.assoc)
        with self._studies_lock:
            accepted = event.assoc in self._accepted
            self._accepted.discard(event.assoc)
        if accepted and not released and not event.assoc.is_rejected:
            # Decided once the association thread has ended: the close can come before that thread has
            # handled the A-RELEASE (is_released) that preceded it.
            threading.Thread(target=self._warn_if_not_released, args=(event.assoc, self._peer(event)),
                             name="ainode-ended-check", daemon=True).start()
        self._forget_studies(event.assoc, hint=released)
        dimse = getattr(event.assoc, "dimse", None)
        partial = getattr(getattr(dimse, "message", None), "data_set", None)
        if isinstance(partial, store_request.CappedDataSet) and partial.spill is not None:
            partial.spill.close()

    @staticmethod
    def _warn_if_not_released(assoc: Association, peer: tuple[str, str, int]) -> None:
        # On a busy machine the association thread may handle the A-RELEASE well after the close; it ends
        # right after it does, so its end is when the answer is final.
        assoc.join(ENDED_JOIN_S)
        if assoc.is_released:
            return
        log.warning("association ended without release (aborted by either side, idle past node.network_timeout_s, "
                    "or the connection was lost) calling_ae=%s ip=%s port=%d; an instance in transfer was not "
                    "acknowledged and must be sent again", *peer)

    def _forget_studies(self, assoc: object, hint: bool) -> None:
        """Drop the association's studies; with `hint`, pass them to on_released (the sender is done)."""
        with self._studies_lock:
            studies = self._studies.pop(assoc, None)
        if studies and hint and self.on_released is not None:
            self.on_released(studies)

    def _on_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def _on_event_report(self, event: evt.Event) -> tuple[int, None]:
        """A storage commitment report: recorded in the store; the dispatcher applies it and audits."""
        calling, ip, _ = self._peer(event)
        return record_report(self.store, event, f"{calling}@{ip}")

    # ---- C-STORE -------------------------------------------------------

    def _refuse(self, code: int, comment: str, calling: str, ip: str, sop_uid: str | None, **extra) -> Dataset:
        self.counters.refused += 1
        log.warning("c-store refused status=0x%04X calling_ae=%s reason=%s", code, calling, comment)
        self.audit.append("instance-refused", "failure", calling_ae=calling, peer_ip=ip,
                          sop_instance_uid=sop_uid, status=f"0x{code:04X}", reason=comment, **extra)
        return _status(code, comment)

    def _spool_write_failed(self, exc: OSError, folder: object, calling: str, ip: str,
                            sop_uid: str | None) -> Dataset:
        log.error("spool write failed errno=%s path=%s", exc.errno, folder)
        return self._refuse(OUT_OF_RESOURCES, f"spool write failed: {exc.strerror}", calling, ip, sop_uid)

    def _duplicate(self, calling: str, ip: str, study_uid: str, series_uid: str, sop_uid: str) -> int:
        """The instance is already held: keep the first copy, answer Success, audit the repeat."""
        self.counters.duplicates += 1
        self.audit.append("instance-duplicate", calling_ae=calling, peer_ip=ip, study_uid=study_uid,
                          series_uid=series_uid, sop_instance_uid=sop_uid)
        return SUCCESS

    def commit_instance(self, meta: InstanceMeta, peer: dict[str, str]) -> bool:
        """Index a durable file and audit it; False if already held. Runs in the node process: a receive
        process calls it there (one round trip for both), so rows and records have one writer."""
        is_new = self.index.add(meta)
        if is_new:
            try:
                self.audit.append("instance-stored", **peer, patient_id=meta.patient_id, study_uid=meta.study_uid,
                                  series_uid=meta.series_uid, sop_instance_uid=meta.sop_instance_uid,
                                  sop_class_uid=meta.sop_class_uid, transfer_syntax=meta.transfer_syntax,
                                  bytes=meta.size_bytes)
            except Exception as exc:
                raise AuditAppendFailed(f"{type(exc).__name__}: {exc}") from exc
            if self.on_indexed is not None:
                try:
                    self.on_indexed(meta)
                except Exception:  # noqa: BLE001 - a hint only: the instance is stored either way
                    log.exception("on_indexed failed")
        return is_new

    def _check(self, data_set: bytes | memoryview, transfer_syntax: UID, calling: str, ip: str, rq_uid: str,
               limit: int) -> Dataset | tuple[Dataset, tuple[str, str, str, str]]:
        """The decoded header and its (SOP instance, study, series, SOP class) UIDs; or the refusal status.

        Everything the sender can get wrong is found here, before the instance is kept (checks.py says why
        each check exists). 0xC000: the bytes cannot be decoded, or a UID is missing or unusable.
        0xA900: decodable, but it contradicts itself or the request. 0xA700: too large to take.
        """
        sop_uid: str | None = None
        try:
            elements = checks.scan(data_set, transfer_syntax, limit, inflate_to_disk_above=self.receive_to_disk_bytes,
                                   open_spill=self._spill_file)
            ds = read_header(data_set, transfer_syntax, elements)
            ids = checks.identity(ds)
            sop_uid = ids[0]
            if sop_uid != rq_uid:
                return self._refuse(DATA_SET_MISMATCH, "SOPInstanceUID differs from the C-STORE request",
                                    calling, ip, sop_uid)
            checks.check_pixel_data(ds, elements, transfer_syntax)
            if unreadable := checks.drop_unreadable_metadata(ds):
                log.warning("c-store attributes with a wrong VR or undecodable, stored but not indexed "
                            "calling_ae=%s sop_instance_uid=%s attributes=%s", calling, sop_uid, ",".join(unreadable))
            return ds, ids
        except checks.TooLarge as exc:
            return self._refuse(OUT_OF_RESOURCES, str(exc), calling, ip, sop_uid or rq_uid or None)
        except checks.DoesNotMatch as exc:
            return self._refuse(DATA_SET_MISMATCH, str(exc), calling, ip, sop_uid or rq_uid or None)
        except checks.CannotUnderstand as exc:
            return self._refuse(CANNOT_UNDERSTAND, str(exc), calling, ip, sop_uid or rq_uid or None)
        except Exception as exc:  # noqa: BLE001 - any other decode failure is the sender's data too
            return self._refuse(CANNOT_UNDERSTAND, f"cannot decode data set: {type(exc).__name__}",
                                calling, ip, sop_uid or rq_uid or None)

    def _store_returned(self, prefix: bytes, data_set: bytes | memoryview, transfer_syntax: UID, calling: str, ip: str,
                        rq_uid: str, limit: int) -> Dataset | int:
        """A result an external service (deid) sends back: checked, then handed to node.deid.returns."""
        checked = self._check(data_set, transfer_syntax, calling, ip, rq_uid, limit)
        if isinstance(checked, Dataset):
            return checked
        sop_uid = checked[1][0]
        try:
            back = self.returns.receive(prefix + data_set, calling, ip)
        except Exception as exc:  # noqa: BLE001 - never Success for a result not queued
            log.error("returned result not handled calling_ae=%s error=%s", calling, type(exc).__name__)
            return self._refuse(OUT_OF_RESOURCES, f"returned result not stored: {type(exc).__name__}",
                                calling, ip, sop_uid)
        if back.status != SUCCESS:
            return self._refuse(back.status, back.reason, calling, ip, sop_uid)
        return SUCCESS

    def _on_store(self, event: evt.Event) -> Dataset | int:
        with self._storing_lock:
            self._storing += 1
            alone = self._storing == 1
        received = event.request.DataSet
        spill = received.spill if isinstance(received, store_request.CappedDataSet) else None
        try:
            return self._store(event, alone, spill)
        finally:
            if spill is not None:
                spill.close()  # deleted unless synced and renamed into the spool
            with self._storing_lock:
                self._storing -= 1

    def _store(self, event: evt.Event, alone: bool, spill: SpillFile | None) -> Dataset | int:
        calling, ip, _ = self._peer(event)
        rq_uid = str(event.request.AffectedSOPInstanceUID or "")
        limit = self.max_data_set_bytes
        transfer_syntax = UID(str(event.context.transfer_syntax))
        received = event.request.DataSet
        if (failed := getattr(received, "failed", None)) is not None:  # the spill file could not be written
            if isinstance(failed, OSError):
                return self._spool_write_failed(failed, self.spool.tmp, calling, ip, rq_uid or None)
            return self._refuse(CANNOT_UNDERSTAND, f"cannot encode file meta: {type(failed).__name__}", calling,
                                ip, rq_uid or None)
        over = isinstance(received, store_request.CappedDataSet) and received.over  # not held: only counted
        data_set: bytes | memoryview
        if spill is not None:
            data_set = spill.data_set()
        else:
            data_set = b"" if over else event.encoded_dataset(include_meta=False)
        if (arrived := received.received if over else len(data_set)) > limit:
            return self._refuse(OUT_OF_RESOURCES, f"data set larger than node.max_dataset_mb "
                                f"({arrived // 2**20} MB)", calling, ip, rq_uid or None)
        try:
            prefix = part10_prefix(str(event.request.AffectedSOPClassUID or ""), rq_uid, transfer_syntax)
        except Exception as exc:  # noqa: BLE001 - a request whose UIDs pydicom cannot encode
            return self._refuse(CANNOT_UNDERSTAND, f"cannot encode file meta: {type(exc).__name__}", calling, ip,
                                rq_uid or None)
        if self.returns is not None and self.returns.handles(calling):
            return self._store_returned(prefix, data_set, transfer_syntax, calling, ip, rq_uid, limit)

        size = (len(prefix) if spill is None else spill.prefix_length) + len(data_set)  # file meta + data set
        to_write = size if spill is None else 0  # a spilled data set is on the disk already (and reserved)
        fits, free = self._room_for(to_write)
        if not fits:
            log.error("spool disk below storage.min_free_mb free_mb=%d", free // 2**20)
            return self._refuse(OUT_OF_RESOURCES, "spool disk below storage.min_free_mb", calling, ip,
                                rq_uid or None, free_mb=free // 2**20)
        # The file is written first; the file reaches the spool folder only once every check has passed
        # and the instance is new. The durable write is one system call that holds no GIL
        # (Spool.finish_temp). With no other C-STORE running, the header is checked on another thread
        # during that call, submitted once the file is open and right before the write (a thread that
        # did Python work of its own after submitting would keep the GIL from the check until done).
        # With others running, their Python fills the wait, and a hand-off to another thread would
        # only add GIL switches: the check runs here, after the write.
        if spill is None:
            try:
                tmp, fd = self.spool.open_temp()
            except OSError as exc:
                return self._spool_write_failed(exc, self.spool.tmp, calling, ip, rq_uid or None)
            write = functools.partial(self.spool.finish_temp, tmp, fd, prefix, data_set)
        else:  # written as it arrived: only its sync is left
            tmp, write = spill.path, spill.sync
        args = (data_set, transfer_syntax, calling, ip, rq_uid, limit)
        checking = self._checker.submit(self._check, *args) if alone else None
        write_error: OSError | None = None
        try:
            write()
        except OSError as exc:  # finish_temp / sync removed the file
            write_error = exc
        published = False
        try:
            checked = checking.result() if checking is not None else self._check(*args)
            if isinstance(checked, Dataset):
                return checked
            ds, (sop_uid, study_uid, series_uid, sop_class) = checked
            # A duplicate is found by commit_instance, which then removes this copy's file (each receipt has
            # a file name of its own). A look-up before publishing would cost every new instance a query
            # (about 4% of the receiver's Python time) to save a rare duplicate its rename.
            path = self.spool.instance_path(study_uid, series_uid, sop_uid)
            if write_error is not None:
                return self._spool_write_failed(write_error, self.spool.tmp, calling, ip, sop_uid)
            try:
                self.spool.publish(tmp, path)
                published = True
            except OSError as exc:
                return self._spool_write_failed(exc, path.parent, calling, ip, sop_uid)
        finally:
            if not published:
                tmp.unlink(missing_ok=True)

        meta = instance_meta(ds, path=str(path), size=size, transfer_syntax=str(transfer_syntax),
                             calling_ae=calling, checked=(sop_uid, study_uid, series_uid, sop_class))
        try:
            is_new = self.committer.commit_instance(meta, {"calling_ae": calling, "peer_ip": ip})
        except AuditAppendFailed:
            raise  # the row is committed and the file is kept; pynetdicom answers 0xC211, the sender resends
        except Exception as exc:  # noqa: BLE001 - any store failure must not answer Success
            log.error("store write failed error=%s", type(exc).__name__)
            path.unlink(missing_ok=True)
            return self._refuse(OUT_OF_RESOURCES, f"store write failed: {type(exc).__name__}", calling, ip, sop_uid)
        if not is_new:  # a concurrent association delivered the same instance first
            path.unlink(missing_ok=True)
            return self._duplicate(calling, ip, study_uid, series_uid, sop_uid)
        self.counters.stored += 1
        self.counters.bytes += size
        with self._studies_lock:
            self._studies.setdefault(event.assoc, set()).add(study_uid)
        return SUCCESS
