"""A PACS back from an outage pushes its backlog: does the node's memory stay flat and its time grow linearly?

    .venv/bin/python bench/backlog.py [--studies 50,100,200] [--instances 100] [--size 128]
                                      [--associations 4] [--quiet-period 2] [--plugin NAME] [--workdir DIR]

The largest backlog is generated once (one pydicom CT template; UIDs, instance numbers and slice
positions vary), the smaller ones are its first studies. For each count a fresh node (`ainode serve`,
empty store) gets every study at once from DCMTK storescu over --associations parallel associations,
each association sending whole studies one after another, as a PACS working through its queue does.

Measured from the first send: (a) every instance acknowledged (all storescu processes exited 0),
(b) every study complete (the last 'study-complete' record of the node's audit log; it includes the
quiet period, which the table states), (c) with --plugin, every job ended. By default no rule is configured
(the config's default rule would run ct_lung on these chest CTs, on the same two cores as the receive):
each complete study is routed to 'no rule matched', so the figures are the node's receive, assembly
and routing. The node's CPU time is printed next to the wall times: on a shared machine it says more
about linearity than the wall clock. Memory: VmHWM (peak RSS) of the node process and of any child
process, and RSS sampled every 0.25 s (at the first send, halfway through, at the end). Every instance
must have an 'instance-stored' record and every study a 'study-complete' record, else the run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.receive_rate import echo, send_groups  # noqa: E402
from tests.support.node_proc import NodeProcess  # noqa: E402


# ---- data -----------------------------------------------------------------------------------


def write_backlog(out: Path, studies: int, instances: int, size: int) -> list[list[Path]]:
    """`studies` one-series CT studies of `instances` int16 slices of size x size, one file list each.

    One dataset is built and re-saved with new UIDs and positions: the synthetic chest CT generator
    costs far too much per slice for 20,000 of them, and the node's receive path does not look at pixels.
    """
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = "20240101", "120000", ""
    ds.Modality, ds.SeriesNumber, ds.Manufacturer, ds.BodyPartExamined = "CT", 1, "bench", "CHEST"
    ds.StudyDescription, ds.SeriesDescription = "Backlog bench", "Axial"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.7 * 512 / size] * 2, 1.0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = -1024, 1, 120
    ds.PixelData = np.random.default_rng(0).integers(0, 2000, (size, size), dtype=np.int16).tobytes()
    backlog = []
    for k in range(studies):
        folder = out / f"study{k:04d}"
        folder.mkdir(parents=True)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (generate_uid() for _ in range(3))
        ds.PatientName, ds.PatientID = f"Backlog^{k:04d}", f"BACKLOG{k:04d}"
        ds.AccessionNumber, ds.StudyID = f"ACC{k:06d}", str(k + 1)
        files = []
        for i in range(instances):
            uid = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = [-179.2, -179.2, -float(i)]
            path = folder / f"ct{i + 1:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        backlog.append(files)
    return backlog


def send_studies(backlog: list[list[Path]], aet: str, port: int, associations: int, logdir: Path) -> float:
    """Wall time for `associations` storescu processes in parallel to send every study; association k
    sends whole studies k, k+n, k+2n, … in order, as a PACS working through its queue does."""
    groups = [[f for study in backlog[k::associations] for f in study] for k in range(associations)]
    return send_groups(groups, aet, port, logdir, calling="BACKLOG", timeout=3600)


# ---- the node's memory ----------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, kB; {} once it is gone."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far: less sensitive than wall time to a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    kids, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                found = [int(c) for c in (task / "children").read_text().split()]
                kids.extend(found)
                todo.extend(found)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return kids


def peak_rss_kb(pid: int) -> dict[int, int]:
    """VmHWM (peak RSS) of a process and of each of its descendants, kB, by pid."""
    return {p: st["VmHWM"] for p in [pid, *descendants(pid)] if "VmHWM" in (st := _status(p))}


@dataclass
class MemorySampler:
    """Samples the RSS of the node and its children; keeps the largest VmHWM seen per process."""

    pid: int
    interval: float = 0.25
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, total RSS kB)
    hwm: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        total = 0
        for p in [self.pid, *descendants(self.pid)]:
            st = _status(p)
            total += st.get("VmRSS", 0)
            if "VmHWM" in st:
                self.hwm[p] = max(self.hwm.get(p, 0), st["VmHWM"])
        self.samples.append((time.time(), total))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> "MemorySampler":
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def rss_at(self, t: float) -> int:
        return min(self.samples, key=lambda s: abs(s[0] - t))[1]


# ---- audit log ------------------------------------------------------------------------------


class AuditTail:
    """Reads the node's audit log as it grows (from an offset, so a poll does not re-read 20,000 lines)."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""
        self.stored: set[str] = set()
        self.complete: dict[str, float] = {}
        self.job_ends: dict[int, tuple[str, float]] = {}  # job id -> (outcome, time)
        self.stored_at: list[float] = []

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if b'"instance-stored"' in line:
                rec = json.loads(line)
                self.stored.add(rec["sop_instance_uid"])
                self.stored_at.append(datetime.fromisoformat(rec["ts"]).timestamp())
            elif b'"job-end"' in line:
                rec = json.loads(line)
                self.job_ends[rec["job_id"]] = (rec["outcome"], datetime.fromisoformat(rec["ts"]).timestamp())
            elif b'"study-complete"' in line:
                rec = json.loads(line)
                if rec.get("outcome", "success") == "success":
                    self.complete[rec["study_uid"]] = datetime.fromisoformat(rec["ts"]).timestamp()


def quarter_rate(times: list[float], q: int) -> float:
    """Instances/s over quarter `q` (0 to 3) of the instances, by their stored time."""
    ts = sorted(times)
    n = len(ts) // 4
    part = ts[q * n:(q + 1) * n]
    return (len(part) - 1) / (part[-1] - part[0]) if len(part) > 1 and part[-1] > part[0] else float("nan")


# ---- one run --------------------------------------------------------------------------------


@dataclass
class Run:
    studies: int
    instances: int
    ack_s: float
    stored_s: float
    first_rate: float  # instances/s over the first quarter of the instances stored
    last_rate: float  # and over the last quarter: lower means the per-instance cost grows with the backlog
    complete_s: float
    jobs_s: float | None  # every job ended (with --plugin)
    peak_rss_mb: float  # VmHWM of `ainode serve`
    child_peak_mb: float  # the largest VmHWM of any one child process (worker)
    total_peak_mb: float  # the largest sampled RSS of the node and its children together
    rss_mb: tuple[float, float, float]  # at the first send, halfway through (a), at the end
    cpu_s: float  # CPU time `ainode serve` used from the first send to the end


def one_run(work: Path, backlog: list[list[Path]], associations: int, quiet: float, timeout: float,
            plugin: str | None) -> Run:
    n_inst = sum(len(s) for s in backlog)
    # No rule by default (the config's default rule would run ct_lung on every study, competing with the
    # receive for the CPUs); --plugin routes every study to one plugin job.
    rules = [{"name": "backlog", "series": {"modality": "CT"}, "plugin": plugin}] if plugin else []
    cfg = {"assemble": {"quiet_period_s": quiet, "poll_interval_s": 0.2}, "storage": {"min_free_mb": 500},
           "rules": rules}
    node = NodeProcess(work / "node", cfg, prefault=True).start()
    try:
        echo(node.ae_title, node.port)
        audit = AuditTail(node.audit_path)
        with MemorySampler(node.proc.pid) as mem:
            cpu0 = cpu_seconds(node.proc.pid)
            t0 = time.time()
            send_studies(backlog, node.ae_title, node.port, associations, work)
            t_ack = time.time()
            deadline = time.monotonic() + timeout
            jobs = len(backlog) if plugin else 0
            while len(audit.complete) < len(backlog) or len(audit.stored) < n_inst or len(audit.job_ends) < jobs:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"after {timeout:.0f} s the node holds {len(audit.stored)} of {n_inst} "
                                       f"instances and completed {len(audit.complete)} of {len(backlog)} "
                                       f"studies, {len(audit.job_ends)} jobs ended; node log: {node.log_path}")
                if node.proc.poll() is not None:
                    raise RuntimeError(f"the node exited {node.proc.returncode}; log: {node.log_path}")
                time.sleep(0.2)
                audit.poll()
            t_end = time.time()
            cpu = cpu_seconds(node.proc.pid) - cpu0
        if len(audit.stored) != n_inst or len(audit.complete) != len(backlog):
            raise RuntimeError(f"{len(audit.stored)} instance-stored records for {n_inst} instances sent, "
                               f"{len(audit.complete)} studies complete of {len(backlog)}")
        failed = sum(1 for outcome, _ in audit.job_ends.values() if outcome != "success")
        if failed:  # noise pixels are no chest: a segmenting plugin may refuse them, after doing its work
            print(f"{failed} of {len(audit.job_ends)} jobs ended without success (outcome in the audit log)",
                  file=sys.stderr)
        main_pid = node.proc.pid
        return Run(
            studies=len(backlog), instances=n_inst, ack_s=t_ack - t0, stored_s=max(audit.stored_at) - t0,
            first_rate=quarter_rate(audit.stored_at, 0), last_rate=quarter_rate(audit.stored_at, 3),
            complete_s=max(audit.complete.values()) - t0,
            jobs_s=max(t for _, t in audit.job_ends.values()) - t0 if plugin else None,
            peak_rss_mb=mem.hwm.get(main_pid, 0) / 1024,
            child_peak_mb=max((v for p, v in mem.hwm.items() if p != main_pid), default=0) / 1024,
            total_peak_mb=max(rss for _, rss in mem.samples) / 1024,
            cpu_s=cpu, rss_mb=(mem.rss_at(t0) / 1024, mem.rss_at((t0 + t_ack) / 2) / 1024, mem.rss_at(t_end) / 1024),
        )
    finally:
        node.stop()
        node.kill()


def report(runs: list[Run], args: argparse.Namespace, mb_per_study: float) -> None:
    work = f"every study to plugin {args.plugin}" if args.plugin else "no rule (receive, assembly, routing)"
    print(f"\nBacklog: studies of {args.instances} CT instances ({args.size}x{args.size} int16, {mb_per_study:.1f} MB "
          f"a study) pushed at once by DCMTK storescu over {args.associations} associations (whole studies per "
          f"association); fresh node per count; quiet period {args.quiet_period:g} s; {work}; "
          f"{os.cpu_count()} CPUs")
    head = (f"{'studies':>7s} {'instances':>9s} {'acked s':>8s} {'inst/s':>7s} {'1st/4th qtr inst/s':>18s} "
            f"{'complete s':>10s} {'jobs s':>7s} {'node CPU s':>10s} {'node peak MB':>12s} {'child peak MB':>13s} "
            f"{'all peak MB':>11s} {'RSS start/mid/end MB':>20s}")
    print(head)
    print("-" * len(head))
    for r in runs:
        rss = "/".join(f"{x:.0f}" for x in r.rss_mb)
        quarters = f"{r.first_rate:.1f}/{r.last_rate:.1f}"
        jobs = f"{r.jobs_s:.1f}" if r.jobs_s is not None else "-"
        print(f"{r.studies:7d} {r.instances:9d} {r.ack_s:8.1f} {r.instances / r.ack_s:7.1f} {quarters:>18s} "
              f"{r.complete_s:10.1f} {jobs:>7s} {r.cpu_s:10.1f} {r.peak_rss_mb:12.0f} {r.child_peak_mb:13.0f} "
              f"{r.total_peak_mb:11.0f} {rss:>20s}")
    for a, b in zip(runs, runs[1:]):
        scale = b.studies / a.studies
        jobs = f", jobs x{b.jobs_s / a.jobs_s:.2f}" if a.jobs_s and b.jobs_s else ""
        print(f"{b.studies}/{a.studies} studies (x{scale:g}): acked time x{b.ack_s / a.ack_s:.2f}, complete time "
              f"x{b.complete_s / a.complete_s:.2f}{jobs}, node CPU x{b.cpu_s / a.cpu_s:.2f} (linear = {scale:.2f}); "
              f"node peak RSS x{b.peak_rss_mb / a.peak_rss_mb:.2f}, "
              f"all processes x{b.total_peak_mb / a.total_peak_mb:.2f} (flat = 1.00)")
    print("acked: every storescu process exited 0. 1st/4th qtr: instances/s over the first and the last quarter of "
          "the instances by their audit timestamps (a lower 4th quarter: an instance costs more as the backlog "
          "grows). complete: the last study-complete audit record (includes the quiet period). jobs: the last "
          "job-end (--plugin). node CPU: user + system time of `ainode serve` (its threads, not its workers) over the "
          "run. node peak: VmHWM of `ainode serve`; child peak: the largest VmHWM of one child "
          "(worker) process; all peak: the largest sampled RSS of the node and its children together. Every "
          "instance-stored and study-complete record was checked.")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", default="50,100,200", help="comma-separated study counts, one fresh node each")
    ap.add_argument("--instances", type=int, default=100, help="instances per study (one series)")
    ap.add_argument("--size", type=int, default=128, help="rows = columns of each int16 slice")
    ap.add_argument("--associations", type=int, default=4, help="parallel storescu associations")
    ap.add_argument("--quiet-period", type=float, default=2.0, help="assemble.quiet_period_s of the node")
    ap.add_argument("--plugin", help="route every study to this plugin (e.g. ct_lung) and also time until every "
                    "job ended; default: no rule, the figures are receive, assembly and routing")
    ap.add_argument("--timeout", type=float, default=900, help="seconds a run may take after the send")
    ap.add_argument("--workdir", type=Path, help="where the node lives (default: a temp dir "
                    "on disk); the generated studies are kept there and reused by the next run with the same options")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the senders and the node too
    counts = [int(c) for c in args.studies.split(",")]
    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install dcmtk", file=sys.stderr)
            return 2
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ainode-bench-backlog-", dir=args.workdir))
    runs: list[Run] = []
    try:
        t = time.perf_counter()
        data = (args.workdir or tmp) / f"data-{max(counts)}x{args.instances}-{args.size}"
        if args.workdir and (data / "done").exists():  # generated by an earlier run with the same options
            backlog = [sorted(d.iterdir()) for d in sorted(data.glob("study*"))]
        else:
            shutil.rmtree(data, ignore_errors=True)
            backlog = write_backlog(data, max(counts), args.instances, args.size)
            (data / "done").touch()
        mb_per_study = sum(f.stat().st_size for f in backlog[0]) / 1e6
        print(f"{max(counts)} studies x {args.instances} instances ({args.size}x{args.size} int16, "
              f"{mb_per_study:.1f} MB a study) ready in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        for n in counts:
            r = one_run(tmp / f"run{n}", backlog[:n], args.associations, args.quiet_period, args.timeout,
                        args.plugin)
            runs.append(r)
            print(f"{n} studies: acked {r.ack_s:.1f} s, complete {r.complete_s:.1f} s, "
                  f"peak RSS {r.peak_rss_mb:.0f} MB", file=sys.stderr)
            shutil.rmtree(tmp / f"run{n}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(runs, args, mb_per_study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
