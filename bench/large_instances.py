"""Large instances: what receiving one costs the node in time and memory, spilled to disk or held.

    .venv/bin/python bench/large_instances.py [--mb 400] [--count 2] [--repeat 2] [--associations 1]

A data set past node.receive_to_disk_mb (default 16) goes straight into its spool file as it arrives
(node/receive/spill.py); below it, it is gathered in memory and written with one durable call. This
sends --count synthetic single-frame CT instances of about --mb MB each (DCMTK storescu, over
--associations associations) to a fresh node with its default, and to one with receive_to_disk_mb set
above the instance size (held in memory), alternating the two --repeat times. It prints the median wall
time of the send, and how much the peak RSS (VmHWM) of the node's processes grew during it: the largest
growth of one process, as that is the process that received.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.backlog import peak_rss_kb  # noqa: E402
from bench.receive_rate import AinodeProcesses, send_groups  # noqa: E402


def make_instances(out: Path, mb: float, count: int) -> list[Path]:
    """`count` CT images of about `mb` MB each (a square 16-bit frame), each with UIDs of its own."""
    import numpy as np
    import pydicom
    import pydicom.data
    from pydicom.uid import generate_uid

    side = int((mb * 2**20 / 2) ** 0.5) // 2 * 2
    template = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    del template[0xFFFCFFFC]  # Data Set Trailing Padding: storescu would leave it out
    template.StudyInstanceUID, template.SeriesInstanceUID = generate_uid(), generate_uid()
    template.Rows = template.Columns = side
    template.PixelData = np.arange(side * side, dtype=np.uint16).tobytes()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.InstanceNumber = i + 1
        files.append(out / f"large{i:03d}.dcm")
        template.save_as(files[-1], enforce_file_format=True)
    return files


def held_node(to_disk_mb: float) -> type[AinodeProcesses]:
    """The bench's default node, with node.receive_to_disk_mb set (None: the node's default)."""

    class Node(AinodeProcesses):
        def _write_config(self) -> None:
            super()._write_config()
            if to_disk_mb is not None:
                text = self.config.read_text().replace("receive_processes:", f"receive_to_disk_mb: {to_disk_mb}, "
                                                       "receive_processes:", 1)
                self.config.write_text(text)
    return Node


def one_send(node_cls: type[AinodeProcesses], work: Path, files: list[Path], associations: int) -> tuple[float, int]:
    """(seconds, largest growth of one node process's peak RSS in MB) for one send to a fresh node."""
    with node_cls(work) as node:
        before = peak_rss_kb(node.proc.pid)
        seconds = send_groups([files[i::associations] for i in range(associations)], node.aet, node.port, work)
        after = peak_rss_kb(node.proc.pid)
        stored = node.received()
        if stored is not None and stored != len(files):
            raise RuntimeError(f"the node stored {stored} of {len(files)} instances ({work / 'node.log'})")
    grown = max(after[p] - before.get(p, 0) for p in after) // 1024
    return seconds, grown


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=400, help="size of each instance, MB")
    ap.add_argument("--count", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--associations", type=int, default=1)
    args = ap.parse_args()
    modes = {"default (to disk past 16 MB)": None, f"held in memory (receive_to_disk_mb {args.mb * 2:g})": args.mb * 2}
    results: dict[str, list[tuple[float, int]]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="ainode-bench-large-") as tmp:
        files = make_instances(Path(tmp) / "data", args.mb, args.count)
        size_mb = sum(f.stat().st_size for f in files) / 2**20
        for r in range(args.repeat):
            for k, (mode, to_disk) in enumerate(modes.items()):
                work = Path(tmp) / f"run{r}-{k}"
                work.mkdir()
                seconds, grown = one_send(held_node(to_disk), work, files, args.associations)
                results[mode].append((seconds, grown))
                print(f"round {r + 1}/{args.repeat} {mode}: {seconds:.2f} s, peak RSS +{grown} MB", flush=True)
    print(f"\nLarge instances: {args.count} x {size_mb / args.count:.0f} MB ({size_mb:.0f} MB), DCMTK storescu over "
          f"{args.associations} association(s), fresh node each send, median of {args.repeat}")
    print(f"{'how the node receives':45} {'seconds':>8} {'MB/s':>7} {'peak RSS growth MB':>19}")
    print("-" * 82)
    for mode, runs in results.items():
        s = statistics.median(r[0] for r in runs)
        print(f"{mode:45} {s:8.2f} {size_mb / s:7.0f} {statistics.median(r[1] for r in runs):19.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
