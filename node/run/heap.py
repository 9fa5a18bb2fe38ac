"""Worker processes keep the memory they free, for their next job.

glibc hands every allocation over 32 MB (a series volume is 315 MB, a SEG's masks as much) to mmap and gives
it back to the kernel when freed, so the next job's volume lands on new pages that the kernel must fault in
and zero. In a virtual machine whose host takes freed guest memory back (free page reporting, balloons;
seen on the test VMs, which return it within 5 s) that first touch cost 0.7 s for 315 MB against 0.02 s for
memory the process kept. So a worker takes all memory from its heap and never trims it: after its first job
a worker's resident size stays at its peak, which run.memory_limit_mb watches as before.

The same holds for memory a thread allocates (the prefetch of the next job's series and its `prepare`, the
read threads): glibc gives each thread an arena of its own, and those give large freed blocks back whatever
the trim setting, so one arena serves every thread. Without it, a 1-slot `ct_nodule` burst here faulted in
about 250 MB of new pages a study (`bench/gpu_burst.py --stand-in-inference 0.07`: 8.2 s against 6.7 s for 10
studies, system time 6.0 against 2.7 s). Python's small objects do not use glibc's arenas (pymalloc), and
the large blocks are few, so the one arena's lock should see little contention (not measured apart: the
burst as a whole got faster).

Its first job still lands on new pages. `prefault` touches memory once when the worker starts and keeps it:
a fresh worker's first ct_lung job on a 300-slice CT took 2.9-3.2 s in the plugin and 0.9 s to load the
series, against 1.0 s and 0.07 s for the next job; touching 512 MB first took 0.3 s and made the first job as
fast as the next (numpy's scattered first touches of its arrays cost far more than one sequential pass).
"""

from __future__ import annotations

import ctypes
import logging
import time

log = logging.getLogger("ainode.run")

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make this process's allocator keep freed memory (glibc only; elsewhere a no-op). True if applied."""
    try:  # by name, as node/lifeline.py loads it (find_library would run ldconfig at every worker start)
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        log.debug("mallopt not available; freed memory goes back to the system")
        return False
    # Before the process starts threads: a thread takes its arena at its first allocation.
    return all([mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, NEVER_TRIM), mallopt(M_ARENA_MAX, 1)])


def prefault(size: int) -> float:
    """Touch `size` bytes of heap and free them, so that the next allocations reuse touched pages; seconds
    taken. Only useful after keep_freed_memory (otherwise glibc returns the block to the kernel at once)."""
    t = time.perf_counter()
    if size > 0:
        block = bytearray(size)  # zero-filled: every page written once
        del block
    return time.perf_counter() - t
