"""What a process maps from /dev/shm: named POSIX semaphores (multiprocessing locks and queues) outlive a
process group killed with SIGKILL, so the node must not hold any."""

from __future__ import annotations


def named_semaphores(pid: int) -> set[str]:
    """The /dev/shm/sem.* files process `pid` maps (a creator maps a temporary name, shown as deleted)."""
    with open(f"/proc/{pid}/maps") as maps:
        return {line.split(None, 5)[-1].strip() for line in maps if "/dev/shm/sem." in line}
