"""C-FIND SCU: how many instances a PACS holds of one study, and of each of its series.

Asks only for UIDs and counts (no patient attributes), so nothing in an answer can reach a log.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterator

from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as STUDY_ROOT_FIND

from node.config.schema import Source
from node.receive.dul_io import os_socket


class QueryError(Exception):
    """The PACS gave no usable counts. `unreachable`: no association at all (the PACS is down)."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class ExpectedCounts:
    instances: int  # NumberOfStudyRelatedInstances
    series: dict[str, int] | None  # SeriesInstanceUID → NumberOfSeriesRelatedInstances; None: not asked


def _where(src: Source) -> str:
    return f"{src.ae_title}@{src.host}:{src.port}"


def _quiesce_reactor(assoc: Association, settle_s: float = 0.01, limit_s: float = 0.2) -> None:
    """Make sure the association's reactor thread is blocked before a C-FIND is sent.

    pynetdicom 3 pauses its requestor reactor before sending, but checks a flag the reactor sets just
    before it blocks; a reactor that has just passed its checkpoint still shows that flag, takes the
    C-FIND's first response off the queue itself and drops it ("Received unexpected C-FIND service
    message"). On a loaded machine that lost answers: a PACS that "lists no series", a prior study not
    found. Clearing the checkpoint here and waiting longer than one reactor loop (1 ms) closes the gap.
    """
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    if checkpoint is None:  # another pynetdicom: nothing to do
        return
    checkpoint.clear()
    deadline = time.monotonic() + limit_s
    time.sleep(settle_s)
    while not getattr(assoc, "_is_paused", True) and time.monotonic() < deadline:
        time.sleep(0.001)


def _find(assoc: Association, src: Source, query: Dataset) -> Iterator[Dataset]:
    started = time.monotonic()
    _quiesce_reactor(assoc)
    for status, ident in assoc.send_c_find(query, STUDY_ROOT_FIND):
        code = getattr(status, "Status", None)
        if code is None and time.monotonic() - started < src.timeout_s:  # not a timeout: the PACS hung up
            raise QueryError(f"{_where(src)} closed the association on our C-FIND: register our AE title "
                             f"'{assoc.requestor.ae_title}' in the PACS as a modality allowed to query")
        if code is None:
            raise QueryError(f"no C-FIND response from {_where(src)} within {src.timeout_s:g}s "
                             "(sources.*.timeout_s)")
        if code in (0xFF00, 0xFF01):
            if ident is not None:
                yield ident
        elif code != 0x0000:
            raise QueryError(f"{_where(src)} answered C-FIND with status 0x{code:04X}")


def _count(ds: Dataset, keyword: str, src: Source) -> int:
    value = ds.get(keyword)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise QueryError(f"{_where(src)} answered without {keyword}; it cannot vouch for completeness "
                         "(set query: false for this source)") from None


def _study_count(assoc: Association, src: Source, study_uid: str) -> int:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    q.NumberOfStudyRelatedInstances = ""
    answers = [a for a in _find(assoc, src, q) if a.get("StudyInstanceUID", study_uid) == study_uid]
    if not answers:
        raise QueryError(f"{_where(src)} does not hold the study (no C-FIND match)")
    return _count(answers[0], "NumberOfStudyRelatedInstances", src)


def _series_counts(assoc: Association, src: Source, study_uid: str) -> dict[str, int]:
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.StudyInstanceUID = study_uid
    q.SeriesInstanceUID = ""
    q.NumberOfSeriesRelatedInstances = ""
    out = {}
    for a in _find(assoc, src, q):
        uid = str(a.get("SeriesInstanceUID") or "")
        if not uid:
            raise QueryError(f"{_where(src)} answered a series-level C-FIND without SeriesInstanceUID")
        out[uid] = _count(a, "NumberOfSeriesRelatedInstances", src)
    if not out:
        raise QueryError(f"{_where(src)} lists no series for the study")
    return out


def _no_nagle(assoc: Association) -> None:
    """pynetdicom leaves Nagle's algorithm on: each C-FIND then waits ~40 ms for a delayed ACK."""
    sock = os_socket(assoc)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # only a latency optimisation


def expected_counts(src: Source, calling_ae: str, study_uid: str,
                    ask_series: Callable[[int], bool] = lambda _n: True) -> ExpectedCounts:
    """Study-level count, then (if `ask_series(count)`) the series-level counts, over one association.

    Every network step is bounded by `src.timeout_s`. Raises QueryError naming the PACS and what to do.
    """
    ae = AE(ae_title=src.calling_ae_title or calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = src.timeout_s
    ae.connection_timeout = src.timeout_s
    ae.add_requested_context(STUDY_ROOT_FIND)
    try:
        assoc = ae.associate(src.host, src.port, ae_title=src.ae_title)
        if not assoc.is_established:
            if assoc.is_rejected:
                raise QueryError(f"{_where(src)} rejected the association from "
                                 f"'{src.calling_ae_title or calling_ae}': register that AE title in the PACS "
                                 "as a modality allowed to query (C-FIND)")
            raise QueryError(f"cannot connect to {_where(src)}: is the PACS running and the port right?",
                             unreachable=True)
        _no_nagle(assoc)
        try:
            total = _study_count(assoc, src, study_uid)
            series = _series_counts(assoc, src, study_uid) if ask_series(total) else None
            return ExpectedCounts(total, series)
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        ae.shutdown()
