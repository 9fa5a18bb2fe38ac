"""Worker processes keep the memory they free, for their next job.

glibc hands every allocation over 32 MB (a series volume is 315 MB, a SEG's masks as much) to mmap and gives
it back to the kernel when freed, so the next job's volume lands on new pages that the kernel must fault in
and zero. In a virtual machine whose host takes freed guest memory back (free page reporting, balloons;
seen on the test VMs, which return it within 5 s) that first touch cost 0.7 s for 315 MB against 0.02 s for
memory the process kept. So a worker takes all memory from its heap and never trims it: after its first job
a worker's resident size stays at its peak, which run.memory_limit_mb watches as before.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("ainode.run")

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make this process's allocator keep freed memory (glibc only; elsewhere a no-op). True if applied."""
    try:  # by name, as node/lifeline.py loads it (find_library would run ldconfig at every worker start)
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        log.debug("mallopt not available; freed memory goes back to the system")
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
