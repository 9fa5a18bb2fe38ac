"""Shared by the latency benches: a real Orthanc holds a synthetic CT and pushes it (C-STORE) to the node,
run as a subprocess; we wait until Orthanc lists the node's results, and keep the node's audit trail.

The node's stages are read from its own audit records (instance-stored, study-complete, job-start, job-end,
object-sent) and the job's recorded timings; "listed" is when Orthanc's REST API first shows a result series.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from node.synth import write_chest_ct  # noqa: E402
from tests.support.node_proc import NodeProcess  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402

LIST_POLL_S = 0.025  # how often Orthanc is asked for the result series (the figure's resolution)


def ts(rec: dict) -> float:
    """An audit record's time as a Unix timestamp."""
    return datetime.fromisoformat(rec["ts"]).timestamp()


@dataclass
class PushRun:
    records: list[dict]  # the node's audit records, in order
    t_send: float  # Orthanc was asked to send the study
    t_sent: float  # Orthanc's synchronous send returned (every instance acknowledged by the node)
    listed: dict[str, float]  # result modality ("SEG", "SR") -> when Orthanc first listed it

    def first(self, event: str, **match: Any) -> dict:
        rec = next((r for r in self.records if r["event"] == event
                    and all(r.get(k) == v for k, v in match.items())), None)
        if rec is None:
            raise RuntimeError(f"no '{event}' audit record {match or ''} in the node's audit log")
        return rec

    def last_ts(self, event: str) -> float:
        return max(ts(r) for r in self.records if r["event"] == event)


def wait_warm(node: NodeProcess, timeout: float = 120.0) -> None:
    """Wait until the node's worker is warm (torch imported, plugin loaded): a node in service has been up
    for days, and a push during the warm-up would measure the warm-up."""
    deadline = time.monotonic() + timeout
    while "worker ready" not in node.log_path.read_text():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node's worker was not ready after {timeout} s; node log: {node.log_path}")
        time.sleep(0.1)
    time.sleep(1.0)  # its SR process finishes its imports


def _paced_send(orthanc: OrthancServer, study_id: str, per_second: float) -> None:
    """Push the study's instances in order of InstanceNumber, one batch a second, as a scanner sends a
    series while it reconstructs it."""
    instances = [i for s in orthanc.series_of_study(study_id) for i in orthanc.instances_of_series(s["ID"])]
    instances.sort(key=lambda i: int(i["MainDicomTags"].get("InstanceNumber") or 0))
    ids = [i["ID"] for i in instances]
    batch = max(1, round(per_second))
    start = time.monotonic()
    for k in range(0, len(ids), batch):
        time.sleep(max(0.0, start + k / batch - time.monotonic()))
        orthanc.send_study_to_modality("ainode", ids[k:k + batch])


def _steady_send(node: NodeProcess, files: list[Path], per_second: float) -> None:
    """Send the study to the node over one association, one instance every 1/`per_second` s in order of
    InstanceNumber, as a scanner sends a series while it reconstructs it. Sent from here as AE ORTHANC
    (Orthanc pushes a batch per REST call, not one instance at a time over one association); Orthanc holds
    the same files, so the node's C-FIND counts match once every one has arrived."""
    from pydicom import dcmread
    from pynetdicom import AE

    headers = [(int(dcmread(f, stop_before_pixels=True).InstanceNumber), f) for f in files]
    first = dcmread(files[0], stop_before_pixels=True)
    ae = AE(ae_title="ORTHANC")
    ae.add_requested_context(first.SOPClassUID, [first.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        raise RuntimeError(f"the node refused the association; node log: {node.log_path}")
    try:
        start = time.monotonic()
        for k, (_, f) in enumerate(sorted(headers)):
            time.sleep(max(0.0, start + k / per_second - time.monotonic()))
            status = assoc.send_c_store(f)
            if getattr(status, "Status", None) != 0x0000:
                raise RuntimeError(f"C-STORE of {f} answered {status}; node log: {node.log_path}")
    finally:
        assoc.release()


def _send_and_wait(orthanc: OrthancServer, node: NodeProcess, study_uid: str, wanted: set[str],
                   timeout: float, pace: float | None = None,
                   steady: list[Path] | None = None) -> tuple[float, float, dict[str, float], list[dict]]:
    """Have Orthanc push one study to the node (at once, or `pace` instances a second; or send `steady`, its
    files, from here at `pace`); wait until Orthanc lists every wanted result modality in it and the node has
    recorded sending them. (send asked, send returned, when each was listed, the study's audit records)."""
    study_id = orthanc.find_study(study_uid)
    t_send = time.time()
    if pace and steady:
        _steady_send(node, steady, pace)
    elif pace:
        _paced_send(orthanc, study_id, pace)
    else:
        orthanc.send_study_to_modality("ainode", study_id)
    t_sent = time.time()
    deadline = time.monotonic() + timeout
    listed: dict[str, float] = {}
    while time.monotonic() < deadline and not wanted <= listed.keys():
        mods = {s["MainDicomTags"].get("Modality") for s in orthanc.series_of_study(study_id)}
        now = time.time()
        for m in wanted & mods:
            listed.setdefault(m, now)
        time.sleep(LIST_POLL_S)
    if not wanted <= listed.keys():
        raise RuntimeError(f"{sorted(wanted - listed.keys())} not in Orthanc after {timeout} s; "
                           f"node log: {node.log_path}")
    # The PACS can list an object a moment before the node has written its own 'object-sent' record.
    recs: list[dict] = []
    while time.monotonic() < deadline:
        recs = [r for r in node.audit_records() if r.get("study_uid") == study_uid]
        if wanted <= {r.get("kind") for r in recs if r["event"] == "object-sent"}:
            break
        time.sleep(0.05)
    return t_send, t_sent, listed, recs


def push_study(work: Path, *, slices: int, seed: int, node_config: Callable[[OrthancServer], dict],
               modalities: Iterable[str] = ("SR",), timeout: float = 600, warm_up: bool = False,
               transfer_syntax: str = "ExplicitVRLittleEndian", pace: float | None = None,
               steady: bool = False) -> PushRun:
    """Write a `slices`-slice 512x512 chest CT, upload it to a fresh Orthanc, start the node with
    `node_config(orthanc)`, let Orthanc push the study to the node and wait until Orthanc lists every
    result modality in `modalities` and the node has recorded sending them.

    `warm_up`: first push another study of the same size through the node, not measured: a node in
    service has run jobs before, and its worker reuses the memory they used (node/run/heap.py).
    `transfer_syntax`: how the CT is encoded (a name node.synth accepts); Orthanc stores and pushes it so.
    `pace`: instances a second for the measured study (default: all at once, as fast as Orthanc sends), in
    one batch a second from Orthanc; with `steady`, one instance every 1/pace s over one association."""
    wanted = set(modalities)
    thickness = 1.0 if slices >= 300 else 2.5
    synth = write_chest_ct(work / "ct", slices=slices, slice_thickness=thickness, seed=seed,
                           transfer_syntax=transfer_syntax)
    first = write_chest_ct(work / "warm-up", slices=slices, slice_thickness=thickness, seed=seed + 10_000,
                           transfer_syntax=transfer_syntax) if warm_up else None
    with OrthancServer(work / "orthanc", aet="ORTHANC") as orthanc:
        orthanc.upload_files(synth.files)
        if first is not None:
            orthanc.upload_files(first.files)
        node = NodeProcess(work / "node", node_config(orthanc), prefault=True).start()
        try:
            wait_warm(node)
            orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", node.port)
            if first is not None:
                _send_and_wait(orthanc, node, first.study_uid, wanted, timeout)
                time.sleep(1.0)  # the node idle again, as before a study arrives
            t_send, t_sent, listed, recs = _send_and_wait(orthanc, node, synth.study_uid, wanted, timeout, pace,
                                                          synth.files if steady else None)
        finally:
            node.stop()
            node.kill()
    return PushRun(recs, t_send, t_sent, listed)


def print_table(title: str, runs: list[dict[str, float]]) -> None:
    """Median, min and max of each figure over the runs (figures that are None in a run are left out)."""
    print(f"\n{title}")
    print(f"{'stage':52s} {'median s':>9s} {'min':>7s} {'max':>7s}")
    for key in runs[0]:
        vals = [r[key] for r in runs if r.get(key) is not None]
        if not vals:
            print(f"{key:52s} {'n/a':>9s}")
            continue
        print(f"{key:52s} {statistics.median(vals):9.2f} {min(vals):7.2f} {max(vals):7.2f}")
