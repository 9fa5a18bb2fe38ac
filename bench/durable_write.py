"""What making one received instance durable costs on this disk, by the parts of the node's write.

    .venv/bin/python bench/durable_write.py [--size 525000] [--count 200] [--repeat 3] [--workdir DIR]

The receive bench (receive_rate.py) shows the node close to DCMTK storescp when the spool is on tmpfs,
where fsync costs nothing, and well below it on a real disk. This bench says where that disk time goes.
Each row writes --count files of --size bytes (a 512x512 CT slice by default) into --workdir, one after
the other and from 4 threads at once (as 4 associations do), and reports the median ms per file:

  node               the node's own Spool.write_durable: temp file opened O_DSYNC, one write, rename,
                     folder fsync (what each C-STORE waits for before its Success);
  node, no folder    the same without the rename's folder fsync (not durable: a power cut can lose
                     the rename);
  new file O_DSYNC   the O_DSYNC write of a new file alone;
  overwrite O_DSYNC  the same bytes written O_DSYNC over a file whose blocks were written and synced
                     before (no block allocation, so no journal commit: only the data and a cache flush);
  overwrite, then publish
                     that file then renamed into the spool and its folder fsynced (Spool.publish): what
                     a spool that kept temp files written ahead of time would wait for.

The gap between "new file" and "overwrite" is the filesystem allocating a new file's blocks durably (a
journal commit). Preparing such space ahead of time costs as much again once the preparing is counted
(bench/RESULTS.md, 2026-12-05). The figures vary with the disk and its load, so compare rows of one run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from node.receive.spool import Spool  # noqa: E402

THREADS = 4


def _dsync_write(path: Path, data: bytes, flags: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DSYNC | flags, 0o640)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _kinds(folder: Path, data: bytes, count: int) -> dict[str, tuple[Callable[[int, str], None],
                                                                     Callable[[int], None]]]:
    """Each kind: (write file `i` of writer `tag`, prepare the folder before a run with that many writers)."""
    spools: list[Spool] = []  # the spool of the current run

    def node(i: int, tag: str) -> None:
        spool = spools[-1]
        spool.write_durable(spool.root / "study" / "series" / f"{tag}-{i}.dcm", data)

    def node_no_folder(i: int, tag: str) -> None:
        spool = spools[-1]
        tmp = spool.write_temp(data)
        dest = spool.root / "study" / "series" / f"{tag}-{i}.dcm"
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, dest)

    def new_spool(threads: int = 1) -> None:
        shutil.rmtree(folder / "spool", ignore_errors=True)
        spools.append(Spool(folder / "spool"))

    def new_file(i: int, tag: str) -> None:
        _dsync_write(folder / "new" / f"{tag}-{i}", data, os.O_CREAT | os.O_EXCL)

    def overwrite(i: int, tag: str) -> None:
        _dsync_write(folder / "pre" / f"{tag}-{i}", data, 0)

    def prewritten_node(i: int, tag: str) -> None:
        tmp = folder / "pre" / f"{tag}-{i}"
        _dsync_write(tmp, data, 0)
        spool = spools[-1]
        spool.publish(tmp, spool.root / "study" / "series" / f"{tag}-{i}.dcm")

    def fresh(*names: str) -> Callable[[int], None]:
        def prepare(threads: int = 1) -> None:
            for name in names:
                shutil.rmtree(folder / name, ignore_errors=True)
                (folder / name).mkdir(parents=True)
        return prepare

    def prewritten(threads: int = 1) -> None:  # the files `overwrite` writes over, written and synced
        new_spool()
        fresh("pre")()
        for tag in _tags(threads):
            for i in range(_per_writer(count, threads)):
                (folder / "pre" / f"{tag}-{i}").write_bytes(bytes(len(data)))
        os.sync()

    return {"node": (node, new_spool), "node, no folder fsync": (node_no_folder, new_spool),
            "new file O_DSYNC": (new_file, fresh("new")), "overwrite O_DSYNC": (overwrite, prewritten),
            "overwrite, then publish": (prewritten_node, prewritten)}


def _tags(threads: int) -> list[str]:
    return [f"t{t}" for t in range(threads)] if threads > 1 else ["s"]


def _per_writer(count: int, threads: int) -> int:
    return max(count // threads, 1)


def filesystem(path: Path) -> str:
    """The type and device of the filesystem holding `path`, from /proc/mounts ("?" where unreadable)."""
    best, found = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, kind = line.split()[:3]
            if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, found = mount, f"{kind} on {device}"
    except OSError:
        pass
    return found


def timed(write: Callable[[int, str], None], count: int, threads: int) -> float:
    """ms per file: `count` files by one writer, or split across `threads` writers at once."""
    per = _per_writer(count, threads)
    errors: list[BaseException] = []

    def run(tag: str) -> None:
        try:
            for i in range(per):
                write(i, tag)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread below
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(tag,)) for tag in _tags(threads)]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return (time.perf_counter() - t0) / (per * threads) * 1000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=525_000, help="bytes per file (a 512x512 CT slice: 525,000)")
    ap.add_argument("--count", type=int, default=200, help="files per run")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, help="a folder on the disk to measure (default: the system's "
                    "temp folder; a spool on tmpfs costs nothing to sync)")
    args = ap.parse_args(argv)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="ainode-durable-", dir=args.workdir))
    data = os.urandom(args.size)
    results: dict[tuple[str, int], list[float]] = {}
    try:
        kinds = _kinds(folder, data, args.count)
        for _ in range(args.repeat):  # rounds: a disk that gets busier weighs on every kind alike
            for name, (write, prepare) in kinds.items():
                for threads in (1, THREADS):
                    prepare(threads)
                    os.sync()
                    results.setdefault((name, threads), []).append(timed(write, args.count, threads))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"durable write of {args.count} files of {args.size:,} bytes in {folder.parent} "
          f"({filesystem(folder.parent)}), median of {args.repeat}, ms per file")
    print(f"{'write':24s} {'1 writer':>9s} {f'{THREADS} at once':>10s}")
    for name in kinds:
        print(f"{name:24s} {statistics.median(results[(name, 1)]):9.2f} "
              f"{statistics.median(results[(name, THREADS)]):10.2f}")
    print(f"({THREADS} at once: wall time / files, so the disk's throughput with {THREADS} writers; each writer "
          f"waits about {THREADS}x that for each of its own files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
