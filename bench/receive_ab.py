"""A/B of two checkouts of the node on the receive bench: wall time and the node's CPU per instance.

    .venv/bin/python bench/receive_ab.py OLD_CHECKOUT NEW_CHECKOUT [--rounds 6] [--associations 1,4]
                                         [--receive-processes 1]

For a change to the receive path, where the figure that moves is a few percent and this kind of machine
drifts by more than that over minutes: the two checkouts (e.g. `git worktree add /tmp/old HEAD~1`) run
alternately, one send of the same 300-slice CT each per round, so both see the same load. Each round
starts each node afresh (a new store, every instance new); sender: DCMTK storescu, as in
bench/receive_rate.py, whose receiver class this uses with the checkout on PYTHONPATH. Prints each round
and the medians; "lower in k of n" counts the rounds where the new checkout used less CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import receive_rate as rr  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--associations", default="1,4")
    ap.add_argument("--receive-processes", default="1", help="node.receive_processes for both (default 1)")
    ap.add_argument("--slices", type=int, default=300)
    args = ap.parse_args()
    roots = {"old": args.old.resolve(), "new": args.new.resolve()}
    for name, root in roots.items():
        if not (root / "node" / "__init__.py").exists():
            ap.error(f"{name} checkout {root} has no node/ package")
    counts = [int(a) for a in args.associations.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ainode-ab-"))
    files = rr.make_ct_series(work / "data", args.slices)
    results: dict[tuple[str, int], list[tuple[float, float]]] = {(n, a): [] for n in roots for a in counts}

    class Node(rr.Ainode):
        processes = args.receive_processes

    saved = os.environ.get("PYTHONPATH")
    try:
        for rnd in range(1, args.rounds + 1):
            for name, root in roots.items():
                os.environ["PYTHONPATH"] = str(root)  # the node's subprocess imports `node` from here
                with Node(work / name) as rx:
                    for a in counts:
                        t, cpu, *_ = rr.send_once(rx, files, a, work)
                        results[(name, a)].append((t, cpu or 0.0))
                        print(f"round {rnd}/{args.rounds} {name} x{a}: {t:.2f} s, {cpu:.2f} ms CPU/instance",
                              flush=True)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
        shutil.rmtree(work, ignore_errors=True)  # the CT and both nodes' spools: about 450 MB
    print(f"\n{args.slices} instances, median of {args.rounds} alternated rounds, "
          f"receive_processes: {args.receive_processes}")
    print(f"{'assoc':>5} {'old s':>7} {'new s':>7} {'old CPU ms':>11} {'new CPU ms':>11} {'CPU new/old':>12}  lower in")
    for a in counts:
        old, new = results[("old", a)], results[("new", a)]
        lower = sum(n[1] < o[1] for o, n in zip(old, new))
        oc, nc = statistics.median(c for _, c in old), statistics.median(c for _, c in new)
        print(f"{a:>5} {statistics.median(t for t, _ in old):>7.2f} {statistics.median(t for t, _ in new):>7.2f} "
              f"{oc:>11.2f} {nc:>11.2f} {nc / oc:>11.2f}x  {lower} of {len(old)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
