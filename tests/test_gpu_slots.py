"""GPU slots with memory budgets, CUDA out-of-memory retry and prefetch, tested without a GPU.

The scheduler lives in the node process and only needs to know the GPUs and their budgets, so a config
that names GPU 0 with a budget exercises it on a CPU machine: the slot's worker gets
CUDA_VISIBLE_DEVICES=0, finds no CUDA device and runs the plugin's CPU path (the same code).
"""

import json
import time
from pathlib import Path

import pytest

from node.config.schema import GpuSection
from node.cpus import usable_cpus
from node.receive.spool import scratch_prefix
from node.run.slots import GpuBudget, GpuDevice, PluginNeeds, SlotConfigError, plan_slots, slots_per_gpu
from node.store import NewJob, Store
from node.store.db import InstanceMeta
from node.synth import write_chest_ct
from tests.support.pipeline import query, send
from tests.support.wait import wait_until

NEEDS = {"seg": PluginNeeds(gpu=True, gpu_memory_mb=6000), "huge": PluginNeeds(gpu=True, gpu_memory_mb=40000),
         "lung": PluginNeeds(gpu=False, gpu_memory_mb=0)}


def test_one_worker_per_gpu_slot_and_plugins_that_fit_no_gpu_run_on_cpu():
    gpus = [GpuDevice(0, 16384), GpuDevice(1, 24576)]
    slots = plan_slots(1, GpuSection(slots_per_gpu=2), NEEDS, "auto", gpus=gpus)
    gpu_slots = [s for s in slots if s.gpu]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpu_slots] == ["0", "0", "1", "1"]
    assert [s.gpu.budget_mb for s in gpu_slots] == [15872, 15872, 24064, 24064]  # total less reserve_mb
    assert gpu_slots[0].gpu is gpu_slots[1].gpu  # the slots of one GPU share its budget
    assert all(s.may_run("seg") and not s.may_run("lung") and not s.may_run("huge") for s in gpu_slots)
    (cpu,) = [s for s in slots if s.gpu is None]
    assert cpu.env == {"CUDA_VISIBLE_DEVICES": ""}  # never touches the budgeted GPUs
    assert cpu.may_run("lung") and cpu.may_run("huge") and not cpu.may_run("seg")

    # No GPU (or run.device cpu, or devices: []): every plugin runs on the CPU workers, as before.
    for cfg, device, found in [(GpuSection(), "auto", []), (GpuSection(), "cpu", gpus),
                               (GpuSection(devices=[]), "auto", gpus)]:
        slots = plan_slots(2, cfg, NEEDS, device, gpus=found)
        assert [s.gpu for s in slots] == [None, None] and all(s.may_run("seg") for s in slots)
        assert slots[0].env == {}

    with pytest.raises(SlotConfigError, match=r"run.gpu.devices: GPU 3 is not listed by nvidia-smi"):
        plan_slots(1, GpuSection(devices=[3]), NEEDS, "auto", gpus=gpus)
    with pytest.raises(SlotConfigError, match="run.device is cuda"):
        plan_slots(1, GpuSection(), NEEDS, "cuda", gpus=[])


def test_a_job_that_does_not_fit_waits_at_the_head_of_the_queue(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for k, (plugin, prio) in enumerate([("big", "stat"), ("small", "routine")]):
        uid = f"1.2.9.{k}"
        store.add_instance(InstanceMeta(f"{uid}.9", "1.2.840.10008.5.1.4.1.1.2", f"{uid}.5", uid,
                                        "1.2.840.10008.1.2.1", f"/x/{uid}", 1, "A"))
        store.mark_complete(uid, "quiet-period", time.time() + 1)
        store.route(uid, [NewJob("r", plugin, prio, [f"{uid}.5"], [])])
    gpu = GpuBudget(0, 1000)
    assert gpu.try_reserve(600)  # a running job holds 600 MB
    need = {"big": 800, "small": 100}
    admit = lambda job: gpu.try_reserve(need[job.plugin])  # noqa: E731
    # The stat job needs 800 MB and only 400 are free: nothing is claimed, and the small routine job,
    # which would fit, does not overtake it.
    assert store.claim_job(900, admit=admit) is None
    gpu.release(600)
    assert store.claim_job(900, admit=admit).plugin == "big" and gpu.used_mb == 800
    assert store.claim_job(900, may_run=lambda p: p != "small") is None  # may_run filters by plugin
    store.close()


def _jobs(node):
    return [dict(zip(("id", "plugin", "state", "started", "finished", "summary", "timings"), r))
            for r in query(node, "select id, plugin, state, started_at, finished_at, summary, timings "
                                 "from jobs order by id")]


def test_gpu_memory_budget_serialises_jobs_that_do_not_fit_together(tmp_path, node_factory, test_plugins,
                                                                    monkeypatch):
    # GPU 0 with a 1000 MB budget and 2 slots. big (600 MB) + big does not fit; big + small and
    # small + small do. Two studies, each routed to both plugins. Without OMP_NUM_THREADS in the node's
    # environment, each of the three workers' torch gets a third of the CPUs (at least one thread).
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    entry = "tests.plugins.gpu_sim:SleepGpuPlugin"
    node = node_factory({
        "run": {"gpu": {"devices": [0], "memory_mb": 1000, "slots_per_gpu": 2}},
        "plugins": {"big": {"entry": entry, "gpu_memory_mb": 600, "options": {"seconds": 2}},
                    "small": {"entry": entry, "gpu_memory_mb": 400, "options": {"seconds": 2}}},
        "rules": [{"name": "big", "plugin": "big"}, {"name": "small", "plugin": "small"}],
    })
    for seed in range(2):
        send(node, write_chest_ct(tmp_path / f"ct{seed}", slices=10, rows=64, cols=64, seed=seed).files)
    jobs = wait_until(lambda: len(j := _jobs(node)) == 4 and all(x["state"] == "done-no-destination" for x in j)
                      and j, 120, "four jobs done")
    share = max(1, usable_cpus() // 3)
    assert all(j["summary"] == f"CUDA_VISIBLE_DEVICES='0' threads={share}" for j in jobs)

    def overlap(a, b):
        return a["started"] < b["finished"] and b["started"] < a["finished"]

    big = [j for j in jobs if j["plugin"] == "big"]
    assert not overlap(*big), "two 600 MB jobs ran together on a 1000 MB GPU budget"
    assert any(overlap(a, b) for a in jobs for b in jobs if a["id"] < b["id"]), "the two slots never ran together"
    starts = [r for r in node.audit_records() if r["event"] == "job-start"]
    assert {r["worker"] for r in starts} <= {"ainode-gpu0-0", "ainode-gpu0-1"}
    node_start = next(r for r in node.audit_records() if r["event"] == "node-start")
    assert [w["gpu_budget_mb"] for w in node_start["workers"]] == [1000, 1000, None]
    assert node.stop() == 0


def test_cuda_out_of_memory_is_retried_at_half_batch_and_fails_only_its_job(tmp_path, node_factory, test_plugins):
    entry = "tests.plugins.gpu_sim:OomPlugin"
    node = node_factory({
        "plugins": {"oom_once": {"entry": entry, "options": {"fits_at": 0.5}},
                    "oom_always": {"entry": entry, "options": {"fits_at": 0}},
                    "probe": {"entry": "tests.plugins.gpu_sim:PrefetchProbePlugin", "options": {"seconds": 0.5}}},
        "rules": [{"name": "a", "study": {"calling_ae": "ONCE"}, "plugin": "oom_once"},
                  {"name": "b", "study": {"calling_ae": "ALWAYS"}, "plugin": "oom_always"},
                  {"name": "c", "study": {"calling_ae": "AFTER"}, "plugin": "probe"}],
    })
    for seed, calling in enumerate(["ONCE", "ALWAYS", "AFTER"]):
        send(node, write_chest_ct(tmp_path / calling, slices=10, rows=64, cols=64, seed=seed).files, calling=calling)
        wait_until(lambda n=seed + 1: len([r for r in node.audit_records() if r["event"] == "job-end"]) == n,
                   60, f"job {seed + 1} to end")
    ends = {r["plugin"]: r for r in node.audit_records() if r["event"] == "job-end"}
    assert ends["oom_once"]["outcome"] == "success"
    assert ends["oom_once"]["timings"]["oom_retries"] == 1 and ends["oom_once"]["timings"]["batch_scale"] == 0.5
    assert ends["oom_always"]["outcome"] == "failure"
    assert "CUDA out of memory even at batch scale 0.125 (plugin oom)" in ends["oom_always"]["error"]
    assert ends["probe"]["outcome"] == "success"  # the worker served on
    pids = {r["worker"] for r in node.audit_records() if r["event"] == "job-start"}
    assert pids == {"ainode-worker-0"}
    assert not any("worker process" in (r.get("error") or "") for r in ends.values())  # never restarted
    assert node.stop() == 0


def test_next_job_input_is_decoded_and_prepared_while_the_current_job_runs(tmp_path, node_factory, test_plugins):
    node = node_factory({
        "assemble": {"quiet_period_s": 0.5},
        "plugins": {"probe": {"entry": "tests.plugins.gpu_sim:PrefetchProbePlugin", "options": {"seconds": 3}}},
        "rules": [{"name": "probe", "plugin": "probe"}],
    })
    for seed in range(2):
        send(node, write_chest_ct(tmp_path / f"ct{seed}", slices=30, rows=128, cols=128, seed=seed).files)
    jobs = wait_until(lambda: len(j := _jobs(node)) == 2 and all(x["state"] == "done-no-destination" for x in j)
                      and j, 90, "two jobs done")
    first, second = jobs
    timings = [json.loads(j["timings"]) if isinstance(j["timings"], str) else j["timings"] for j in jobs]
    assert "prefetched" not in timings[0] and first["summary"].startswith("prepared_in=MainThread")
    # The second study was decoded and prepared in the prefetch thread before its job started.
    assert timings[1]["prefetched"] == 1 and second["summary"].startswith("prepared_in=prefetch")
    assert float(second["summary"].split("ahead_s=")[1].split()[0]) > 0.5
    assert "slices=30" in second["summary"]
    # Both prepares (in the job and ahead of it) got an empty folder of their own in the spool's temp folder,
    # named for their job, and it was gone once they returned: nothing staged there is left, in /tmp or
    # anywhere else.
    for job in jobs:
        fields = dict(part.split("=", 1) for part in job["summary"].split())
        scratch = Path(fields["prepare_scratch"])
        assert scratch.parent == node.var / "spool" / ".tmp", scratch
        assert scratch.name.startswith(scratch_prefix(job["id"])), scratch
        assert fields["empty"] == "True" and fields["left"] == "False", job["summary"]
    assert node.stop() == 0


def test_each_worker_gets_its_share_of_the_cpus_as_threads_unless_the_environment_says(monkeypatch):
    import node.cpus

    monkeypatch.setattr(node.cpus, "usable_cpus", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert node.cpus.worker_thread_env(4) == {"OMP_NUM_THREADS": "4"}
    assert node.cpus.worker_thread_env(5) == {"OMP_NUM_THREADS": "3"}
    assert node.cpus.worker_thread_env(32) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the administrator's choice is left as it is
    assert node.cpus.worker_thread_env(4) == {}


def test_check_config_says_how_many_threads_each_worker_gets(tmp_path, monkeypatch):
    from node.config import load_config
    from node.run.slots import describe_slots

    path = tmp_path / "node.yaml"
    path.write_text("run: {workers: 2, gpu: {devices: [0], memory_mb: 8000, slots_per_gpu: 1}}\n")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    share = max(1, usable_cpus() // 3)  # one GPU slot and two CPU workers
    assert f"torch threads per worker: {share} (the CPUs shared among the workers)" in \
        describe_slots(load_config(path).config)
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert "torch threads per worker: OMP_NUM_THREADS=5 (from the environment)" in \
        describe_slots(load_config(path).config)


NODULE = {"ct_nodule": PluginNeeds(gpu=True, gpu_memory_mb=2048, memory_mb=3072)}


def test_slots_per_gpu_auto_gives_each_gpu_a_slot_per_four_cpus_within_its_memory_and_the_hosts():
    def auto(cpus, budgets=(80000,), host_mb=131072, needs=NODULE, cpu_workers=1):
        return slots_per_gpu("auto", list(budgets), needs, cpu_workers, cpus=cpus, host_mb=host_mb)

    assert slots_per_gpu(3, [80000], NODULE, 1, cpus=2).per_gpu == 3  # a number is taken as it is
    big = auto(16)  # the H100 host measured: 4 slots did 2.6x the studies of 1
    assert big.per_gpu == 4 and big.why == "auto: at most 4"
    assert auto(64).per_gpu == 4
    two = auto(2)  # this VM: one slot, and the reason names the CPUs
    assert two.per_gpu == 1 and "2 usable CPUs for 1 GPU(s)" in two.why
    assert auto(8).per_gpu == 2
    assert auto(32, budgets=(80000, 80000)).per_gpu == 4  # 16 CPUs a GPU
    assert auto(16, budgets=(80000, 80000, 80000, 80000)).per_gpu == 1
    small = auto(16, budgets=(7680,))  # an 8 GB card holds three 2 GB jobs
    assert small.per_gpu == 3 and "GPU budget 7680 MB, 2048 MB a job" in small.why
    host = auto(16, host_mb=16384)  # 70% of 16 GB: three 3 GB jobs, one of them the CPU worker's
    assert host.per_gpu == 2 and "of 16384 MB of memory" in host.why
    assert auto(16, host_mb=4096).per_gpu == 1  # never none
    assert auto(1).per_gpu == 1
    on_ray = slots_per_gpu("auto", [80000], NODULE, 1, cpus=16, ray=True)  # the actors' hosts are elsewhere
    assert on_ray.per_gpu == 1 and "run.executor ray" in on_ray.why
    assert slots_per_gpu(4, [80000], NODULE, 1, cpus=2, ray=True).per_gpu == 4
    idle = auto(16, needs={})
    assert idle.per_gpu == 1 and "no plugin runs on a GPU" in idle.why


def test_gpu_slots_follow_auto_and_check_config_says_why(tmp_path, monkeypatch):
    import node.run.slots
    from node.config import load_config
    from node.run.slots import describe_slots

    monkeypatch.setattr(node.run.slots, "usable_cpus", lambda: 12)
    monkeypatch.setattr(node.run.slots, "physical_memory_mb", lambda: 131072)
    slots = plan_slots(1, GpuSection(), NODULE, "auto", gpus=[GpuDevice(0, 81920)])
    assert [s.name for s in slots] == ["ainode-gpu0-0", "ainode-gpu0-1", "ainode-gpu0-2", "ainode-worker-0"]
    assert slots[0].per_gpu.per_gpu == 3 and slots[-1].per_gpu is None
    assert len(plan_slots(1, GpuSection(slots_per_gpu=1), NODULE, "auto", gpus=[GpuDevice(0, 81920)])) == 2
    # The plugins that fit decide: a 40 GB one leaves room for two jobs on an 80 GB card.
    assert plan_slots(1, GpuSection(), NEEDS, "auto", gpus=[GpuDevice(0, 81920)])[0].per_gpu.per_gpu == 2

    path = tmp_path / "node.yaml"
    path.write_text("run: {gpu: {devices: [0], memory_mb: 8000}}\nplugins: {ct_nodule: {}}\n"
                    "rules: [{name: nodules, series: {modality: CT}, plugin: ct_nodule}]\n")
    text = describe_slots(load_config(path).config)
    assert "GPU slots: 3 per GPU (auto: 12 usable CPUs for 1 GPU(s), 4 a slot)" in text
    path.write_text("run: {gpu: {devices: [0], memory_mb: 8000, slots_per_gpu: 2}}\n")
    assert "GPU slots: 2 per GPU (run.gpu.slots_per_gpu)" in describe_slots(load_config(path).config)
    for bad in ("0", "17", "many"):
        path.write_text(f"run: {{gpu: {{devices: [0], memory_mb: 8000, slots_per_gpu: {bad}}}}}\n")
        with pytest.raises(Exception, match="slots_per_gpu"):
            load_config(path)
