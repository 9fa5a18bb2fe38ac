"""What this host gives the node's workers: the CPUs this process may run on (its affinity mask: a container's
or taskset's limit, not the host's), and the memory."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


JOBS_MEMORY_SHARE = 0.7  # of physical memory, for the jobs of all workers together (run.memory_limit_mb's default)


def physical_memory_mb() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20


THREADS_ENV = "OMP_NUM_THREADS"  # read by torch (and OpenMP, MKL) when it loads; set in the node's environment, it wins


def worker_thread_env(workers: int) -> dict[str, str]:
    """The environment that gives each of `workers` worker processes its share of the usable CPUs as torch
    threads (at least one), unless the node's own environment already sets OMP_NUM_THREADS.

    Left alone, torch starts one thread per core in every worker, and where the workers' threads
    outnumber the cores they wait for each other at every parallel step (OpenMP spins while it waits): two
    ct_nodule jobs side by side on 2 cores took 1.9x as long as with one thread each (bench/RESULTS.md)."""
    if THREADS_ENV in os.environ:
        return {}
    return {THREADS_ENV: str(max(1, usable_cpus() // max(1, workers)))}
