"""Child processes of the node (receive processes, workers, a worker's SR process) die with their parent."""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(check_started_by_parent: bool = True) -> None:
    """SIGKILL this process when the process that started it dies, even by kill -9.

    The kernel's parent-death signal only fires for a parent that dies after it is set, so a parent that died
    while this one was starting (a busy machine, a worker killed at once) is checked for here: without that,
    this process would live on as an orphan. A process forked by a forkserver has the forkserver as its
    parent, not the process that asked for it: it passes check_started_by_parent=False."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not glibc Linux: the pipes' EOF still ends the process
        return
    parent = mp.parent_process()
    if check_started_by_parent and parent is not None and os.getppid() != parent.pid:
        os._exit(0)
