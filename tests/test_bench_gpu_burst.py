"""bench/gpu_burst.py: its figures on a machine without a GPU, and a burst whose worker slot dies ends at once
(bench/device/gpu_check.sh runs it on a GPU, where a slot that could not load the plugin used to leave the
burst waiting until its time limit)."""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from pathlib import Path

import pytest
import torch

from bench.gpu_burst import _covered, _get, _slots, main


def test_a_cpu_burst_prints_the_split_of_slot_time(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--slices", "20", "--studies", "2", "--workers", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "ct_nodule burst: 2 studies of 20x512x512, 1 worker slot(s) (--workers) on cpu" in out
    assert "GPU: none (CPU run; no utilisation figure)" in out
    assert "decode vs inference:" in out
    medians = next(x for x in out.splitlines() if x.startswith("median per job (s): series read "))
    assert "inference " in medians and "build (SEG, and waiting for the SR) " in medians
    assert float(medians.split("CPU of the slot process ")[1].split()[0]) > 0


def test_without_prefetch_each_job_reads_its_own_series(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--slices", "20", "--studies", "2", "--workers", "1", "--device", "cpu", "--no-prefetch"]) == 0
    out = capsys.readouterr().out
    assert "1 worker slot(s) (--workers) on cpu, no prefetch (--no-prefetch)," in out
    medians = next(x for x in out.splitlines() if x.startswith("median per job (s): series read "))
    read = float(medians.split("series read ")[1].split(",")[0])
    waited = float(medians.split("waited for the prefetch ")[1].split(";")[0])
    assert read > 0 and waited == read  # every job waited for its whole series read


def test_a_stand_in_for_the_model_shows_how_busy_the_cpu_side_would_keep_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--slices", "20", "--studies", "2", "--workers", "2", "--device", "cpu",
                 "--stand-in-inference", "0.3"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("stand-in inference (0.3 s a study"))
    share = int(line.split("running ")[1].split("%")[0])
    assert 0 < share <= 100
    assert "GPU: none" not in out


def test_overlapping_spans_count_once():
    assert _covered([(0.0, 1.0), (0.5, 1.5), (3.0, 4.0), (3.2, 3.4)]) == 2.5
    assert _covered([]) == 0.0


def _exit_with(code: int) -> None:
    sys.exit(code)


def test_a_dead_slot_ends_the_burst_at_once():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_exit_with, args=(3,))]
    procs[0].start()
    t = time.monotonic()
    with pytest.raises(SystemExit, match="a worker slot exited with code 3"):
        _get(results, procs)
    assert time.monotonic() - t < 30
    procs[0].join(10)


def test_the_burst_runs_as_many_slots_as_the_node_would(monkeypatch):
    import node.run.slots

    monkeypatch.setattr(node.run.slots, "usable_cpus", lambda: 8)
    monkeypatch.setattr(node.run.slots, "physical_memory_mb", lambda: 65536)
    assert _slots("auto", "cpu") == (2, "auto: 8 usable CPUs for 1 GPU(s), 4 a slot")
    assert _slots(3, "cpu") == (3, "--workers")


def _children(pid: int) -> set[int]:
    out = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        out |= {int(c) for c in (task / "children").read_text().split()}
    return out


def test_the_slots_end_when_the_burst_is_killed(tmp_path):
    """gpu_check.sh stops a burst past its time limit with `timeout`, which signals the bench alone: its slots
    must not live on (on a GPU, holding their models' memory under the next bench)."""
    import os
    import signal
    import subprocess

    bench = subprocess.Popen([sys.executable, "bench/gpu_burst.py", "--slices", "20", "--studies", "40",
                              "--workers", "1", "--device", "cpu"],
                             cwd=Path(__file__).resolve().parents[1], env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    slots: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not slots:
            slots = {c for c in _children(bench.pid)
                     if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()}
            time.sleep(0.2)
        assert slots, "the burst started no slot within 60 s"
        time.sleep(1.0)  # the slot is past its start (die_with_parent set) and working or waiting
        bench.send_signal(signal.SIGKILL)
        bench.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(Path(f"/proc/{c}").exists() for c in slots):
            time.sleep(0.2)
        left = {c for c in slots if Path(f"/proc/{c}").exists()
                and Path(f"/proc/{c}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"}
        assert not left, f"slot processes {left} outlived the killed burst"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait(10)
        for c in slots:  # a failed check leaves none behind either (each slot's SR process dies with it)
            try:
                os.kill(c, signal.SIGKILL)
            except ProcessLookupError:
                pass
