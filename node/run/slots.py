"""Which worker processes the node runs, and which jobs each may take.

One worker per GPU slot (`run.gpu.slots_per_gpu` per GPU), each seeing only its own GPU through
CUDA_VISIBLE_DEVICES, plus `run.workers` CPU workers. GPU plugins run in GPU slots; a job is admitted to
a slot only while its plugin's GPU memory estimate fits in what the other slots of that GPU have left
of the budget, so a plugin that does not fit waits instead of failing with out-of-memory. With no GPU,
every plugin runs in the CPU workers (the plugins' CPU path).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Mapping

from node.config.schema import GpuSection, PluginSection
from node.cpus import JOBS_MEMORY_SHARE, THREADS_ENV, physical_memory_mb, usable_cpus, worker_thread_env
from node.plugin_api import plugin_class

log = logging.getLogger("ainode.run")


class SlotConfigError(ValueError):
    pass


@dataclass(frozen=True)
class GpuDevice:
    index: int
    memory_mb: int  # total memory as reported; the budget is set from it


def detect_gpus() -> list[GpuDevice]:
    """The GPUs nvidia-smi lists; none when it is not installed or finds no GPU (driver missing)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=index,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("nvidia-smi failed, running without GPU error=%s", exc)
        return []
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit():
            gpus.append(GpuDevice(int(parts[0]), int(float(parts[1]))))
    return gpus


class GpuBudget:
    """GPU memory of one GPU shared by its slots: reserved when a job is admitted, released when it ends."""

    def __init__(self, index: int, budget_mb: int) -> None:
        self.index = index
        self.budget_mb = budget_mb
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used_mb(self) -> int:
        return self._used

    def try_reserve(self, mb: int) -> bool:
        with self._lock:
            if self._used + mb > self.budget_mb:
                return False
            self._used += mb
            return True

    def release(self, mb: int) -> None:
        with self._lock:
            self._used = max(0, self._used - mb)


@dataclass(frozen=True)
class PluginNeeds:
    gpu: bool
    gpu_memory_mb: int
    memory_mb: int = 1024  # host memory a job takes (Resources.memory_mb)


@dataclass(frozen=True)
class SlotCount:
    per_gpu: int
    why: str  # what decided it, for check-config and the start-up log


@dataclass
class WorkerSlot:
    name: str
    env: dict[str, str]
    gpu: GpuBudget | None  # None: a CPU worker
    plugins: frozenset[str] | None  # plugins this slot may run; None: any plugin not in `excluded`
    excluded: frozenset[str] = field(default_factory=frozenset)
    per_gpu: SlotCount | None = None  # a GPU slot: how many slots its GPU has, and why

    def may_run(self, plugin: str) -> bool:
        if self.plugins is not None:
            return plugin in self.plugins
        return plugin not in self.excluded


def plugin_needs(names: list[str], sections: Mapping[str, PluginSection]) -> dict[str, PluginNeeds]:
    """GPU use and memory estimate of each plugin: the plugin's Resources, unless the config overrides it."""
    out = {}
    for name in names:
        section = sections.get(name)
        res = plugin_class(name, section.entry if section else None).resources
        mb = section.gpu_memory_mb if section is not None and section.gpu_memory_mb is not None else res.gpu_memory_mb
        out[name] = PluginNeeds(bool(res.gpu), int(mb), int(res.memory_mb))
    return out


# run.gpu.slots_per_gpu: auto. On the H100 (16 cores), 4 slots ran a burst of uncompressed ct_nodule studies
# at 2.6x the rate of 1 (bench/RESULTS.md): a slot's series read and results build are CPU work, which other
# slots' inference overlaps. Four cores a slot is the most slots measured there.
CPUS_PER_AUTO_SLOT = 4
MAX_AUTO_SLOTS = 4


def slots_per_gpu(setting: int | str, budgets_mb: list[int], needs: Mapping[str, PluginNeeds], cpu_workers: int,
                  cpus: int | None = None, host_mb: int | None = None, ray: bool = False) -> SlotCount:
    """How many worker slots each GPU gets: the setting, or for auto the fewest that the CPUs, the GPU's
    budget and the host's memory allow (see CPUS_PER_AUTO_SLOT). `budgets_mb`: each GPU's budget; `needs`:
    the plugins that run in GPU slots; `ray`: the slots are Ray actors on other machines, whose CPUs and
    memory are not this machine's, so auto keeps to 1."""
    if setting != "auto":
        return SlotCount(int(setting), "run.gpu.slots_per_gpu")
    if ray:
        return SlotCount(1, "auto with run.executor ray: the GPU hosts' CPUs are not known here; set a number")
    if not needs:
        return SlotCount(1, "auto: no plugin runs on a GPU")
    gpus = max(1, len(budgets_mb))
    cpus = usable_cpus() if cpus is None else cpus
    limits = [(MAX_AUTO_SLOTS, f"at most {MAX_AUTO_SLOTS}"),
              (cpus // gpus // CPUS_PER_AUTO_SLOT,
               f"{cpus} usable CPUs for {gpus} GPU(s), {CPUS_PER_AUTO_SLOT} a slot")]
    gpu_mb = max((n.gpu_memory_mb for n in needs.values()), default=0)
    if gpu_mb > 0 and budgets_mb:
        limits.append((min(budgets_mb) // gpu_mb, f"GPU budget {min(budgets_mb)} MB, {gpu_mb} MB a job"))
    host_job_mb = max((n.memory_mb for n in needs.values()), default=0)
    if host_job_mb > 0:
        host_mb = physical_memory_mb() if host_mb is None else host_mb
        jobs = int(host_mb * JOBS_MEMORY_SHARE) // host_job_mb - cpu_workers  # the CPU workers' jobs first
        limits.append((jobs // gpus, f"{JOBS_MEMORY_SHARE:.0%} of {host_mb} MB of memory, {host_job_mb} MB a job "
                                     f"beside {cpu_workers} CPU worker(s)"))
    n, why = min(limits, key=lambda lim: lim[0])
    return SlotCount(max(1, n), f"auto: {why}")


def plan_slots(cpu_workers: int, gpu_cfg: GpuSection, needs: Mapping[str, PluginNeeds], device: str,
               gpus: list[GpuDevice] | None = None, ray: bool = False) -> list[WorkerSlot]:
    """The worker slots for this machine (`ray`: for Ray actors). `gpus` defaults to what nvidia-smi finds."""
    if device == "cpu" or gpu_cfg.devices == []:
        devices: list[GpuDevice] = []
    elif gpu_cfg.devices == "auto":
        devices = detect_gpus() if gpus is None else gpus
    else:
        found = {g.index: g for g in (detect_gpus() if gpus is None else gpus)}
        devices = []
        for i in gpu_cfg.devices:
            if i in found:
                devices.append(found[i])
            elif gpu_cfg.memory_mb is not None:
                devices.append(GpuDevice(i, gpu_cfg.memory_mb + gpu_cfg.reserve_mb))
            else:
                raise SlotConfigError(f"run.gpu.devices: GPU {i} is not listed by nvidia-smi; check the driver "
                                      "and CUDA_VISIBLE_DEVICES, or set run.gpu.memory_mb to use it anyway")
    if device == "cuda" and not devices:
        raise SlotConfigError("run.device is cuda but no GPU is configured or found (run.gpu.devices, nvidia-smi)")

    budgets = [GpuBudget(g.index, gpu_cfg.memory_mb if gpu_cfg.memory_mb is not None
                         else max(0, g.memory_mb - gpu_cfg.reserve_mb)) for g in devices]
    largest = max((b.budget_mb for b in budgets), default=0)
    gpu_plugins = set()
    for name, n in sorted(needs.items()):
        if not n.gpu or not budgets:
            continue
        if n.gpu_memory_mb > largest:
            log.warning("plugin runs on CPU: its GPU memory estimate exceeds every GPU's budget plugin=%s "
                        "needs_mb=%d largest_budget_mb=%d (set plugins.%s.gpu_memory_mb or run.gpu.memory_mb)",
                        name, n.gpu_memory_mb, largest, name)
            continue
        gpu_plugins.add(name)

    slots = []
    count = slots_per_gpu(gpu_cfg.slots_per_gpu, [b.budget_mb for b in budgets],
                          {p: needs[p] for p in gpu_plugins}, cpu_workers, ray=ray)
    for b in budgets:
        fitting = frozenset(p for p in gpu_plugins if needs[p].gpu_memory_mb <= b.budget_mb)
        for k in range(count.per_gpu):
            slots.append(WorkerSlot(f"ainode-gpu{b.index}-{k}", {"CUDA_VISIBLE_DEVICES": str(b.index)}, b, fitting,
                                    per_gpu=count))
    # With GPU slots, CPU workers must not touch a GPU: its memory belongs to the slots' budget.
    cpu_env = {"CUDA_VISIBLE_DEVICES": ""} if slots else {}
    for k in range(cpu_workers):
        slots.append(WorkerSlot(f"ainode-worker-{k}", dict(cpu_env), None, None, frozenset(gpu_plugins)))
    return slots


def describe_slots(cfg) -> str:  # type: ignore[no-untyped-def]
    """One line per worker and per rule plugin, for `ainode check-config`."""
    names = cfg.rule_plugins()  # the built-in forward action runs on CPU workers
    needs = plugin_needs(names, cfg.plugins)
    slots = plan_slots(cfg.run.workers, cfg.run.gpu, needs, cfg.run.device, ray=cfg.run.executor == "ray")
    lines = []
    if cfg.run.executor == "ray":
        r = cfg.run.ray
        lines.append(f"executor: ray at {r.address} (namespace {r.namespace}, data by {r.data}); each worker below "
                     f"is a Ray actor with {r.num_cpus:g} CPU(s), a GPU worker 1/slots_per_gpu of a GPU")
    counts = {s.per_gpu for s in slots if s.per_gpu is not None}
    for c in counts:
        lines.append(f"GPU slots: {c.per_gpu} per GPU ({c.why})")
    for s in slots:
        where = f"GPU {s.gpu.index} (budget {s.gpu.budget_mb} MB)" if s.gpu else "CPU"
        runs = ", ".join(sorted(s.plugins)) if s.plugins is not None else "plugins without a GPU slot"
        lines.append(f"worker {s.name}: {where}; runs {runs or 'nothing'}")
    if cfg.run.executor != "ray":
        threads = worker_thread_env(len(slots))
        lines.append(f"torch threads per worker: {threads[THREADS_ENV]} (the CPUs shared among the workers)"
                     if threads else f"torch threads per worker: {THREADS_ENV}={os.environ[THREADS_ENV]} (from "
                     "the environment)")
    on_gpu = {p for s in slots if s.plugins for p in s.plugins}
    for name in names:
        n = needs[name]
        lines.append(f"plugin {name}: " + (f"GPU, {n.gpu_memory_mb} MB per job" if name in on_gpu else "CPU"))
    if cfg.run.gpu_decode is not False:
        from node.run import gpu_decode

        why = gpu_decode.installed() if on_gpu else "no plugin runs on a GPU"
        setting = "on" if cfg.run.gpu_decode is True else "auto"
        lines.append(f"run.gpu_decode: {setting}, " + (f"but {why}: slices are decoded on the CPU" if why else
                                                        "GPU workers decode JPEG 2000, HTJ2K and JPEG slices on "
                                                        "their GPU (each says so in its log, or why not)"))
    return "\n".join(lines)
