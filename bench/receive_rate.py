"""C-STORE receive rate of the node against its C++ peers: same files, same sender, same machine, same run.

    .venv/bin/python bench/receive_rate.py [--slices 300] [--repeat 3] [--associations 1,4]
                                           [--receivers storescp,storescp-fsync,orthanc,ainode,ainode-mp]
                                           [--data DIR] [--workdir DIR]

Sender: DCMTK storescu for every receiver, over 127.0.0.1; with N associations the files are split
into N groups sent by N storescu processes in parallel. Each figure is the median wall time of
--repeat sends of the whole series into an empty receiver, checked afterwards (every instance must
be there, else the run fails). All receivers run at once and are sent to in rounds (one send to each
per round), so a shared host's load, which drifts over minutes, weighs on every receiver alike; the
target lines also give each round's own ratio. A node is stopped between its rounds (idle, it uses a few
% of a core); the C++ peers idle at well under 1%. `ainode` is the node with one receive process
(node.receive_processes: 1); `ainode-mp` is its default (auto: one receive process per CPU, at most 4).

Durability is not the same for all of them, and the table says so: DCMTK storescp writes each file
and answers without fsync (it has no option for it); Orthanc fsyncs each stored file
(SyncStorageArea, its default since 1.7.4) and indexes it in SQLite; the node fsyncs each instance's
file and its folder entry, and commits its database row, before it answers Success (on SQLite the
row's commit does not wait for the WAL fsync: start-up reconciliation re-indexes the durable file).
Each round also times the node's durable write alone on the same files and disk, and the run ends with
what storescp would reach with that write added to each round trip: an estimate of what answering only
once the instance is on disk costs (with_durable_write). `storescp-fsync` measures it instead: the same
storescp with bench/fsync_on_close.c preloaded (LD_PRELOAD; built with the system's C compiler at start),
which fsyncs each received file and its folder before storescp answers. storescp serves one association
at a time (its default, --single-process), so its figures with 4 associations are those of one after
another. After each send the bench waits for the disk (sync), so no receiver's unwritten data is written
back during the next one's send. Each row also gives the senders' CPU (the storescu processes') and the
share of the machine's CPU time left idle during the send: on a machine this small the senders take a
large part of it. Where the idle share is near zero the CPUs set the pace; where it is high, waiting did
(for the disk, or for the other side).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.net import free_port, wait_for_port  # noqa: E402
from node.receive.spool import Spool  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402


# DCMTK >= 3.6.2 leaves Nagle's algorithm on unless TCP_NODELAY=1 is in the environment: storescu
# and storescp (and Debian's Orthanc, which links the same DCMTK) then wait ~40 ms per C-STORE for a
# delayed ACK on loopback, and the table would measure that timer instead of the receivers.
# --nagle keeps DCMTK's default to show it.
NAGLE = False
PY_SPY = Path(sys.executable).with_name("py-spy")
PROFILE: Path | None = None  # --profile: py-spy samples of the node's GIL-holding threads, one file per run


def dcmtk_env() -> dict[str, str]:
    env = dict(os.environ)
    if NAGLE:
        env.pop("TCP_NODELAY", None)
    else:
        env["TCP_NODELAY"] = "1"
    return env


# ---- data -----------------------------------------------------------------------------------


def make_ct_series(out_dir: Path, slices: int) -> list[Path]:
    """The project's synthetic chest CT; a plain 512x512 int16 series if node.synth is not there."""
    try:
        from node.synth import write_chest_ct
    except ImportError:
        return _plain_ct_series(out_dir, slices)
    return list(write_chest_ct(out_dir, slices=slices, slice_thickness=1.0).files)


def _plain_ct_series(out_dir: Path, slices: int) -> list[Path]:
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    files = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Bench^CT", "BENCH0001", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = \
            "20240101", "120000", "", "", "1"
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 1, k + 1, "bench"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-179.2, -179.2, -float(k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.KVP = -1024, 1, 120
        ds.PixelData = rng.integers(0, 2000, (512, 512), dtype=np.int16).tobytes()
        path = out_dir / f"ct{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


# ---- sender ---------------------------------------------------------------------------------


def send(files: list[Path], aet: str, port: int, associations: int, logdir: Path) -> float:
    """Wall time to send all files with `associations` storescu processes in parallel."""
    return send_groups([files[i::associations] for i in range(associations)], aet, port, logdir)


def send_groups(groups: list[list[Path]], aet: str, port: int, logdir: Path, *, calling: str = "BENCH",
                timeout: float = 600) -> float:
    """Wall time for one storescu process per (non-empty) group, all in parallel; raises if one failed."""
    groups = [g for g in groups if g]
    logs = [open(logdir / f"storescu-{i}.log", "w+b") for i in range(len(groups))]
    procs: list[subprocess.Popen] = []
    try:
        t0 = time.perf_counter()
        for g, log in zip(groups, logs):
            procs.append(subprocess.Popen(["storescu", "-aet", calling, "-aec", aet, "127.0.0.1", str(port),
                                           *map(str, g)], stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=dcmtk_env()))
        for p in procs:
            p.wait(timeout)
        elapsed = time.perf_counter() - t0
        for p, log in zip(procs, logs):
            log.seek(0)
            out = log.read().decode(errors="replace")
            errors = [line for line in out.splitlines() if line.startswith(("E:", "F:"))]
            if p.returncode != 0 or errors:
                raise RuntimeError(f"storescu to {aet} failed (exit {p.returncode}): {out[-800:]}")
        return elapsed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


def echo(aet: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        r = subprocess.run(["echoscu", "-aet", "BENCH", "-aec", aet, "127.0.0.1", str(port)],
                           capture_output=True, text=True, timeout=30, env=dcmtk_env())
        if r.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no C-ECHO answer from {aet} on port {port}: {r.stderr.strip()[-300:]}")
        time.sleep(0.2)


def stop_group(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    """SIGTERM the process group, SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


# ---- receivers ------------------------------------------------------------------------------


class Storescp:
    key, label, durability = "storescp", "DCMTK storescp 3.6.7", "no fsync"

    def __init__(self, work: Path) -> None:
        self.work, self.aet, self.port = work, "STORESCP", free_port()
        self.out = work / "received"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Storescp":
        self.out.mkdir(parents=True)
        self.log = open(self.work / "storescp.log", "wb")
        self.proc = subprocess.Popen(["storescp", "-aet", self.aet, "-od", str(self.out), str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=self._env())
        if not wait_for_port("127.0.0.1", self.port, 20):
            self.__exit__()
            raise RuntimeError("storescp did not listen")
        echo(self.aet, self.port)
        return self

    def _env(self) -> dict[str, str]:
        return dcmtk_env()

    def pause(self) -> None:
        """storescp waits in accept(): nothing to stop."""

    def reset(self) -> None:
        shutil.rmtree(self.out)
        self.out.mkdir()

    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def received(self) -> int:
        return sum(1 for _ in self.out.iterdir())

    def __exit__(self, *exc: object) -> None:
        stop_group(self.proc)
        self.log.close()


class StorescpFsync(Storescp):
    """storescp with bench/fsync_on_close.c preloaded: each file and its folder entry fsynced before the
    answer, as the node does; a measured counterpart of the with_durable_write estimate. Built at start with
    the system's C compiler; without one this receiver is reported as not available."""

    key, label, durability = "storescp-fsync", "DCMTK storescp + fsync", "fsync file+dir (shim)"

    def __enter__(self) -> "StorescpFsync":
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            raise RuntimeError("needs a C compiler for bench/fsync_on_close.c (apt-get install gcc)")
        self.work.mkdir(parents=True, exist_ok=True)
        self.shim, self.count = self.work / "fsync_on_close.so", self.work / "fsynced"
        built = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(self.shim),
                                str(Path(__file__).with_name("fsync_on_close.c")), "-ldl"],
                               capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"building bench/fsync_on_close.c failed: {built.stderr.strip()[-300:]}")
        return super().__enter__()  # type: ignore[return-value]

    def _env(self) -> dict[str, str]:
        return {**dcmtk_env(), "LD_PRELOAD": str(self.shim), "FSYNC_ON_CLOSE_COUNT": str(self.count)}

    def reset(self) -> None:
        super().reset()
        self.count.unlink(missing_ok=True)

    def received(self) -> int:
        """Instances stored, checked against the files the shim made durable (it was in effect for each)."""
        got = super().received()
        fsynced = self.count.stat().st_size if self.count.exists() else 0
        if fsynced != got:
            raise RuntimeError(f"the fsync shim made {fsynced} of the {got} received files durable")
        return got


class Orthanc:
    key, label, durability = "orthanc", "Orthanc 1.10.1 (Debian)", "fsync file, SQLite"

    def __init__(self, work: Path) -> None:
        self.server = OrthancServer(work, aet="ORTHANC", tcp_nodelay=not NAGLE)
        self.aet = self.server.aet

    def __enter__(self) -> "Orthanc":
        self.server.start()
        self.port = self.server.dicom_port  # final only once started
        echo(self.aet, self.port)
        return self

    def pause(self) -> None:
        """Idle Orthanc uses well under 1% of a core: it stays up between its rounds."""

    def reset(self) -> None:
        self.server.delete_all()
        if self.received():
            raise RuntimeError("Orthanc is not empty after delete")

    def received(self) -> int:
        return int(self.server.statistics()["CountInstances"])

    def pid(self) -> int | None:
        return self.server.proc.pid if self.server.proc else None

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


class Sent(NamedTuple):
    seconds: float
    cpu_ms: float | None  # the receiver's CPU per instance (None: no process of its own to measure)
    sender_ms: float  # the storescu processes' CPU per instance
    idle: float  # share of the machine's CPU time idle or waiting for the disk during the send


def _machine_cpu() -> tuple[int, int]:
    """(idle + iowait, all) clock ticks of every CPU since boot, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return ticks[3] + ticks[4], sum(ticks)


def _children_cpu_s() -> float:
    """CPU seconds of this process's waited-for children: the storescu processes of the sends."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def send_once(rx: Any, files: list[Path], associations: int, logdir: Path) -> Sent:
    """One send into an emptied receiver. Raises unless every instance arrived."""
    rx.reset()
    pid = rx.pid()
    c0 = _tree_cpu_s(pid) if pid else 0.0
    s0, (i0, a0) = _children_cpu_s(), _machine_cpu()
    t = send(files, rx.aet, rx.port, associations, logdir)
    s1, (i1, a1) = _children_cpu_s(), _machine_cpu()
    c = (_tree_cpu_s(pid) - c0) / len(files) * 1000 if pid else None
    got = rx.received()
    if got is not None and got != len(files):
        raise RuntimeError(f"{rx.key} holds {got} of {len(files)} instances after the send")
    # What a receiver left unwritten (storescp: all 158 MB, it never syncs) is written back now, not while
    # the next receiver fsyncs: that writeback made the next one's fsyncs wait (the durable write alone took
    # 1.45 ms a file right after a round, 0.85 ms on a quiet disk).
    os.sync()
    rx.pause()
    return Sent(t, c, (s1 - s0) / len(files) * 1000, (i1 - i0) / max(a1 - a0, 1))


def durable_write_s(files: list[Path], folder: Path) -> list[float]:
    """Seconds the node's own durable write (Spool.write_durable: O_DSYNC write, rename, folder fsync) takes
    for each file, one after the other, on the disk the receivers store to; the files are removed after.

    A receiver that answers only once the instance is on disk adds about this much to each round trip;
    storescp writes without it (it has no fsync option): with_durable_write estimates what that costs it."""
    spool = Spool(folder)
    taken = []
    os.sync()  # as after each send (send_once): no other writer's writeback in these figures
    try:
        for i, f in enumerate(files):
            data = f.read_bytes()
            t = time.perf_counter()
            spool.write_durable(spool.instance_path("1.2.3", "1.2.3.4", f"1.2.3.4.{i}"), data)
            taken.append(time.perf_counter() - t)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return taken


def with_durable_write(rate: float, associations: int, write_s: float) -> float:
    """Instances/s of a receiver as fast as one measured at `rate` that adds a durable write of `write_s` to
    each round trip: each of the n associations waits its round trip (n / rate) plus the write.

    An estimate, not a bound: it takes the writes of different associations to overlap (the disk took 4 at
    once faster than one after another here) and the write's CPU to be free, but also the write to add its
    whole time, where a receiver can do other work of the instance meanwhile (the node checks the header
    during it), and the write's time to be the one measured alone, which varies from minute to minute."""
    return associations / (associations / rate + write_s)


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (utime + stime from /proc)."""
    total = 0.0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return total


def settle(pid: int, timeout: float = 90.0) -> None:
    """Wait until the node is idle: its worker processes import torch and load plugins after the port
    opens, and a send during that warm-up would measure the warm-up (Orthanc is measured warm too)."""
    deadline = time.monotonic() + timeout
    last = _tree_cpu_s(pid)
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _tree_cpu_s(pid)
        if now - last < 0.1:  # under 10% of a core over the last second
            return
        last = now


class Ainode:
    key, label, durability = "ainode", "ainode", "fsync file+dir, SQLite"
    processes: int | str = 1  # node.receive_processes (default auto: AinodeProcesses)

    def __init__(self, work: Path) -> None:
        self.work, self.aet, self.port = work, "AINODE", free_port()
        self.config = work / "node.yaml"
        self.var = work / "var"
        self.proc: subprocess.Popen | None = None
        self.log = None
        exe = Path(sys.executable).with_name("ainode")
        self.cmd = [str(exe)] if exe.exists() else ([shutil.which("ainode")] if shutil.which("ainode") else None)
        if self.cmd is None:
            raise RuntimeError("the ainode console script is not installed (pip install -e .)")

    def _write_config(self) -> None:
        # The node's config schema (YAML is a superset of JSON; written without a yaml dependency).
        self.config.write_text(
            f"node: {{ae_title: {self.aet}, host: 127.0.0.1, port: {self.port}, "
            f"receive_processes: {self.processes}}}\n"
            f"storage: {{root: '{self.var}'}}\n"
            "assemble: {quiet_period_s: 3600}\n")

    def _start(self) -> None:
        self._write_config()
        self.log = open(self.work / "node.log", "ab")
        self.proc = subprocess.Popen([*self.cmd, "serve", "--config", str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.work,
                                     start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 60
        while not wait_for_port("127.0.0.1", self.port, 0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.work / "node.log").read_text(errors="replace").strip().splitlines()[-3:]
                self._stop()
                raise RuntimeError(f"`ainode serve` exited {self.proc.returncode}: {' | '.join(tail)}")
        echo(self.aet, self.port)
        self.answered_at = time.perf_counter()  # first C-ECHO answered; settling (below) comes after
        settle(self.proc.pid)
        self.spy = None
        if PROFILE is not None:
            PROFILE.mkdir(parents=True, exist_ok=True)
            out = PROFILE / f"ainode-{len(list(PROFILE.glob('*.raw'))):02d}.raw"
            self.spy = subprocess.Popen([str(PY_SPY), "record", "--gil", "-r", "200",
                                         "-f", "raw", "-o", str(out), "-p", str(self.proc.pid)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _stop(self) -> None:
        if getattr(self, "spy", None) is not None:
            self.spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            self.spy.wait(30)
            self.spy = None
        stop_group(self.proc, timeout=60)
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> "Ainode":
        self.work.mkdir(parents=True, exist_ok=True)
        self._start()
        return self

    def pause(self) -> None:
        """Stopped until its next round: an idle node uses a few % of a core, which the other receivers'
        rounds would pay for."""
        self._stop()

    def reset(self) -> None:
        # A fresh node and store per run, so every instance is new rather than a duplicate.
        self._stop()
        shutil.rmtree(self.var, ignore_errors=True)
        self._start()

    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def received(self) -> int | None:
        """Instances the node recorded as stored, where its audit log says; None: trust storescu."""
        audit = self.var / "audit.jsonl"
        if not audit.exists():
            return None
        return sum(1 for line in audit.read_text().splitlines() if '"instance-stored"' in line)

    def __exit__(self, *exc: object) -> None:
        self._stop()


def _auto_receive_processes() -> int:
    """What node.receive_processes: auto (the default) starts here (the node's own rule)."""
    from node.config.schema import NodeConfig
    return NodeConfig().receive_process_count()


class AinodeProcesses(Ainode):
    """The node as configured by default: node.receive_processes auto (one receive process per CPU, at most 4)."""

    key, label = "ainode-mp", f"ainode, {_auto_receive_processes()} receive proc"
    processes = "auto"  # type: ignore[assignment]

    def _start(self) -> None:
        super()._start()
        if self.processes == 1 or (self.processes == "auto" and _auto_receive_processes() == 1):
            return
        deadline = time.monotonic() + 60  # the port answers before the extra receive processes listen
        while "receive processes listening" not in (self.work / "node.log").read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError("the node's receive processes did not start (node.log)")
            time.sleep(0.2)


RECEIVERS = {cls.key: cls for cls in (Storescp, StorescpFsync, Orthanc, Ainode, AinodeProcesses)}


# ---- main -----------------------------------------------------------------------------------


def print_profile(folder: Path, top: int = 20) -> None:
    """The node's functions by share of GIL-holding samples (inclusive), over every profiled run."""
    inclusive: dict[str, int] = {}
    total = 0
    for raw in sorted(folder.glob("*.raw")):
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            total += int(n)
            for frame in set(stack.split(";")):
                if "(node/" in frame or "(pynetdicom/" in frame or "(pydicom/" in frame:
                    inclusive[frame] = inclusive.get(frame, 0) + int(n)
    print(f"\nprofile: {total} py-spy samples with the GIL held ({folder}); inclusive share, top {top}:")
    for frame, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * n / max(total, 1):5.1f}%  {frame}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--associations", default="1,4", help="comma-separated counts of parallel associations")
    ap.add_argument("--receivers", default="storescp,storescp-fsync,orthanc,ainode,ainode-mp")
    ap.add_argument("--data", type=Path, help="a folder of DICOM files to send instead of a synthetic CT")
    ap.add_argument("--workdir", type=Path, help="where receivers store (default: a temp dir); a real disk "
                    "matters, fsync on tmpfs costs nothing")
    ap.add_argument("--nagle", action="store_true", help="keep DCMTK's default (Nagle on, no TCP_NODELAY) "
                    "for storescu, storescp and Orthanc")
    ap.add_argument("--profile", type=Path, help="record the node with py-spy (GIL-holding samples) into this "
                    "folder and print where its time went; needs `pip install py-spy`")
    args = ap.parse_args()
    # `kill` (SIGTERM) stops the run as Ctrl-C does: the finally blocks below stop the receivers it started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    global NAGLE, PROFILE
    NAGLE = args.nagle
    if args.profile:
        if not PY_SPY.exists():
            print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
            return 2
        PROFILE = args.profile
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install dcmtk", file=sys.stderr)
            return 2
    keys = [k.strip() for k in args.receivers.split(",") if k.strip()]
    unknown = [k for k in keys if k not in RECEIVERS]
    if unknown:
        ap.error(f"unknown receiver(s) {unknown}; choose from {','.join(RECEIVERS)}")
    assoc_counts = [int(a) for a in args.associations.split(",")]

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="ainode-bench-", dir=args.workdir))
    results: dict[tuple[str, int], float] = {}
    cpu_ms: dict[tuple[str, int], float] = {}  # receiver's CPU per instance (process and its children)
    times: dict[tuple[str, int], list[float]] = defaultdict(list)  # every round's wall time
    writes: list[float] = []  # durable_write_s of every file, every round
    cpu: dict[tuple[str, int], list[float]] = defaultdict(list)
    senders: dict[tuple[str, int], list[float]] = defaultdict(list)  # storescu CPU ms per instance
    idle: dict[tuple[str, int], list[float]] = defaultdict(list)  # machine's idle share during the send
    unavailable: dict[str, str] = {}
    failed = False
    try:
        if args.data:
            files = sorted(p for p in args.data.rglob("*") if p.is_file() and not p.name.startswith("."))
        else:
            t0 = time.perf_counter()
            files = make_ct_series(tmp / "ct", args.slices)
            print(f"generated {len(files)} CT slices in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        if not files:
            print("no files to send", file=sys.stderr)
            return 2
        mb = sum(f.stat().st_size for f in files) / 1e6

        running: dict[str, Any] = {}
        try:
            for key in keys:
                work = tmp / key
                work.mkdir()
                try:
                    rx = RECEIVERS[key](work)
                    rx.__enter__()
                except Exception as exc:  # noqa: BLE001 - report and go on with the other receivers
                    unavailable[key] = str(exc)
                    print(f"{key}: not available ({exc})", file=sys.stderr)
                    continue
                rx.pause()  # a node started here would otherwise idle through the peers' first round
                running[key] = rx
            # Rounds, not one receiver after another: each round sends once to every receiver, so a host
            # that gets busier or quieter during the run slows every receiver alike and the ratios hold.
            for rnd in range(args.repeat):
                writes += durable_write_s(files, tmp / "durable-write")
                for n in assoc_counts:
                    for key in list(running):
                        rx = running[key]
                        try:
                            t, c, sender_ms, idle_share = send_once(rx, files, n, tmp / key)
                        except Exception as exc:  # noqa: BLE001
                            failed = True
                            print(f"{key}: FAILED ({exc})", file=sys.stderr)
                            running.pop(key).__exit__(None, None, None)
                            continue
                        times[(key, n)].append(t)
                        if c is not None:
                            cpu[(key, n)].append(c)
                        senders[(key, n)].append(sender_ms)
                        idle[(key, n)].append(idle_share)
                        print(f"round {rnd + 1}/{args.repeat} {key} x{n}: {t:.2f} s", file=sys.stderr)
        finally:
            for rx in running.values():
                rx.__exit__(None, None, None)
        results.update({k: statistics.median(v) for k, v in times.items() if v})
        cpu_ms.update({k: statistics.median(v) for k, v in cpu.items() if v})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nC-STORE receive rate: {len(files)} instances, {mb:.0f} MB, DCMTK storescu over 127.0.0.1, "
          f"median of {args.repeat}, {os.cpu_count()} CPUs, DCMTK "
          f"{'Nagle on (its default)' if NAGLE else 'TCP_NODELAY=1'}")
    head = (f"{'receiver':26s} {'durability':22s} {'assoc':>5s} {'seconds':>8s} {'inst/s':>8s} {'MB/s':>7s} "
            f"{'vs storescp':>11s} {'vs Orthanc':>10s} {'CPU ms/inst':>11s} {'senders':>7s} {'idle':>5s}")
    print(head)
    print("-" * len(head))
    for n in assoc_counts:
        for key in keys:
            if (key, n) not in results:
                continue
            t = results[(key, n)]

            def ratio(peer: str) -> str:
                t_peer = results.get((peer, n))
                return f"{t_peer / t:.2f}x" if t_peer else "-"

            cls = RECEIVERS[key]
            print(f"{cls.label:26s} {cls.durability:22s} {n:5d} {t:8.2f} {len(files) / t:8.1f} {mb / t:7.1f} "
                  f"{ratio('storescp'):>11s} {ratio('orthanc'):>10s} "
                  f"{cpu_ms[(key, n)] if (key, n) in cpu_ms else float('nan'):11.2f} "
                  f"{statistics.median(senders[(key, n)]):7.2f} {100 * statistics.median(idle[(key, n)]):4.0f}%")
    for key, reason in unavailable.items():
        print(f"{key}: not available ({reason})")
    print("ratio = receiver's rate / peer's rate (above 1.00x: faster than the peer). DCMTK storescp has no "
          "fsync option (storescp + fsync: the same storescp with bench/fsync_on_close.c preloaded, which fsyncs "
          "each file and its folder before the answer); both serve one association at a time (storescp's "
          "default, --single-process). Orthanc fsyncs each file (SyncStorageArea); the node fsyncs file and "
          "folder. CPU ms/inst: the receiver's CPU time (user + system, its process and direct children) during "
          "the send, per instance; senders: the storescu processes' CPU per instance; idle: the share of the "
          f"machine's CPU time ({os.cpu_count()} CPUs) idle or waiting for the disk during the send.")
    write_s = statistics.median(writes) if writes else None
    if write_s is not None:
        print(f"\ndurable write alone (the node's Spool.write_durable: O_DSYNC write, rename, folder fsync), same "
              f"files, same disk: median {write_s * 1000:.2f} ms per instance (p90 "
              f"{sorted(writes)[int(len(writes) * 0.9)] * 1000:.2f} ms). storescp with it added to each round trip "
              "(an estimate of what writing durably before each answer costs a receiver as fast as storescp):")
        for n in assoc_counts:
            t_scp = results.get(("storescp", n))
            if t_scp:
                rate = len(files) / t_scp
                durable = with_durable_write(rate, n, write_s)
                nodes = [f"{key} {len(files) / t:.0f} inst/s = {len(files) / t / durable:.2f}x of it"
                         for key in ("ainode", "ainode-mp") if (t := results.get((key, n)))]
                print(f"  {n} association(s): {durable:.0f} inst/s = {durable / rate:.2f}x storescp"
                      + (f"; {', '.join(nodes)}" if nodes else ""))
        for n in assoc_counts:
            t_fsync = results.get(("storescp-fsync", n))
            t_scp = results.get(("storescp", n))
            if t_fsync and t_scp:
                nodes = [f"{key} {results[('storescp-fsync', n)] / t:.2f}x of it (round by round: "
                         + " ".join(f"{p / a:.2f}x" for p, a in zip(times[("storescp-fsync", n)], times[(key, n)]))
                         + ")" for key in ("ainode", "ainode-mp") if (t := results.get((key, n)))]
                print(f"  measured, {n} association(s): storescp + fsync {len(files) / t_fsync:.0f} inst/s = "
                      f"{t_scp / t_fsync:.2f}x storescp" + (f"; {', '.join(nodes)}" if nodes else ""))
    if PROFILE is not None:
        print_profile(PROFILE)
    for n in assoc_counts:  # issue 8's targets: >= 1.0x Orthanc and >= 0.7x storescp, per association count
        for key in ("ainode", "ainode-mp"):
            t = results.get((key, n))
            for peer, target in (("orthanc", 1.0), ("storescp", 0.7)):
                if t and results.get((peer, n)):
                    ratio = results[(peer, n)] / t
                    rounds = [p / a for p, a in zip(times[(peer, n)], times[(key, n)])]
                    met = sum(r >= target for r in rounds)
                    print(f"target {key} >= {target:.1f}x {peer} with {n} association(s): {ratio:.3f}x, "
                          f"{'met' if ratio >= target else 'NOT met'} (round by round: "
                          f"{' '.join(f'{r:.2f}x' for r in rounds)}; met in {met} of {len(rounds)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
