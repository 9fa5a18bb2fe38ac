"""A worker process keeps the memory it frees (node/run/heap.py), so its next job reuses touched pages."""

import subprocess
import sys

import pytest

PROBE = """
import sys
import threading
import numpy as np
from node.run.heap import keep_freed_memory

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // 2**20

if sys.argv[1] == "keep":
    assert keep_freed_memory()
base = rss_mb()

def job():
    v = np.ones(200 * 2**20 // 8)  # 200 MB, touched
    del v

if sys.argv[2] == "thread":  # as the prefetch of the next job's series does
    t = threading.Thread(target=job)
    t.start()
    t.join()
else:
    job()
print(rss_mb() - base)
"""


def _held_after_free(mode: str, where: str = "main") -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, where], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_memory_stays_with_the_process_only_when_asked():
    assert _held_after_free("keep") >= 190  # kept for the next job
    assert _held_after_free("plain") < 20  # glibc's default: a large block goes back to the kernel


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_memory_a_thread_frees_stays_with_the_process_too():
    assert _held_after_free("keep", "thread") >= 190


PREFAULT_PROBE = """
import numpy as np
from node.run.heap import keep_freed_memory, prefault

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // 2**20

assert keep_freed_memory()
base = rss_mb()
prefault(300 * 2**20)
touched = rss_mb() - base
v = np.ones(250 * 2**20 // 8)  # a job's volume: lands on the pages touched above
print(touched, rss_mb() - base - touched)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_prefault_touches_memory_the_next_allocation_reuses():
    out = subprocess.run([sys.executable, "-c", PREFAULT_PROBE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    touched, grown = map(int, out.stdout.split())
    assert touched >= 290  # resident, kept
    assert grown < 20  # the 250 MB array took no new pages
