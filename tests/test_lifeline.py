"""A child process whose parent died before the child set its parent-death signal exits by itself (the
kernel's signal would never come): node/lifeline.py, used by workers, SR processes and receive processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from tests.support.wait import wait_until

PARENT = textwrap.dedent("""
    import multiprocessing as mp, os, sys, time

    def child():
        time.sleep(2)  # a slow start: the parent is gone before the child gets to die_with_parent
        from node.lifeline import die_with_parent
        die_with_parent()
        time.sleep(120)  # an orphan would still be here

    if __name__ == "__main__":
        p = mp.get_context("spawn").Process(target=child)
        p.start()
        print(p.pid, flush=True)
        os._exit(0)  # the parent dies at once, as a killed worker does
""")


def test_a_child_whose_parent_died_while_it_started_exits(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": repo})
    pid = int(out.stdout.split()[0])
    try:
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or "Z" in _state(pid), 30, "the orphan to exit")
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.kill(pid, 9)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line for line in f if line.startswith("State:"))
    except (OSError, StopIteration):
        return "Z"
