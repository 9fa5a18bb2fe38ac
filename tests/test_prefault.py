"""run.prefault_mb: a worker touches memory for its first job when it starts (node/run/heap.py), so that job
does not wait for fresh pages; the worker then runs jobs as before."""

import re
import sys

import pytest

from node.synth import write_chest_ct
from tests.support.pipeline import send
from tests.support.wait import wait_until

RULES = [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung"}]


def _worker_rss_mb(node) -> int:
    """Resident size of the node's warm worker process, once it logged that it is ready."""
    wait_until(lambda: "worker ready" in node.log_path.read_text(), 120, "the worker to be warm")
    pid = int(re.search(r"worker ready .*worker_pid=(\d+)", node.log_path.read_text()).group(1))
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1)) // 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator, /proc")
def test_a_worker_holds_the_prefaulted_memory_from_its_start_and_runs_jobs(tmp_path, node_factory):
    plain = node_factory({"rules": RULES, "run": {"sr_process": False}}, name="plain")
    prefaulted = node_factory({"rules": RULES, "run": {"sr_process": False, "prefault_mb": 300}}, name="prefaulted")
    assert _worker_rss_mb(prefaulted) - _worker_rss_mb(plain) >= 250

    ct = write_chest_ct(tmp_path / "ct", slices=40, slice_thickness=5.0)
    send(prefaulted, ct.files)
    end = wait_until(lambda: next((r for r in prefaulted.audit_records() if r["event"] == "job-end"), None), 120,
                     "the job to end")
    assert end["outcome"] == "success", end
