"""The run stage on a Ray cluster (`run.executor: ray`): one warm Ray actor per worker slot.

A `RayRunner` stands in for a PluginProcess in the WorkerPool, so claiming, priorities, retries, GPU
admission, the store and the audit log stay in the node (their only writer) exactly as with local
workers. The actor holds the plugins warm (PluginCache, as the worker child process does) and runs
`execute_job`. Series reach it through Ray's object store (the node ships the files' bytes; results come
back as bytes that the node writes as synced spool temp files) or, with `data: shared_path`, as paths on
a folder every Ray node mounts. The node enforces run.timeout_s and run.memory_limit_mb as it does for a
local worker: it kills the actor, fails the job, and starts a fresh actor. An actor that dies on its own
fails only its job. Input prefetch (node/run/prefetch.py) is not done on Ray: a job's input is shipped
when it starts.

Ray is imported only here and only with executor ray, so a single server needs no Ray installed.
"""

from __future__ import annotations

import atexit
import dataclasses
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable, Mapping

from node.config.schema import PluginSection
from node.receive.spool import Spool
from node.run.gpu_decode import Setting as GpuDecode
from node.run.job_process import BuiltFile, JobOutput, JobSpec, PluginCache, execute_job
from node.run.plugin_process import Abandoned, JobFailed, _rss_bytes
from node.run.ray_config import RaySection
from node.run.slots import SlotConfigError, WorkerSlot

log = logging.getLogger("ainode.run")

MEMORY_POLL_S = 0.25
WAIT_POLL_S = 0.1
PENDING_WARN_S = 30.0


class RayUnavailable(SlotConfigError):
    """Ray is not installed, the cluster cannot be reached, or run.ray does not fit the storage config."""


def _import_ray():  # type: ignore[no-untyped-def]
    try:
        import ray
    except ImportError as exc:
        raise RayUnavailable(f"run.executor is ray but the ray package is not installed ({exc}): "
                             "pip install '.[ray]' on the node and on every Ray node") from exc
    return ray


SCRATCH_PREFIX = "ainode-ray-"


def claim_scratch(parent: Path | None = None) -> tuple[Path, int]:
    """A scratch folder for this actor's process, and the descriptor whose lock marks it in use.

    A job's shipped series and its results are staged in the folder. An actor killed mid-job (run.timeout_s,
    run.memory_limit_mb) never removes them, so a new actor first deletes every actor folder on this machine
    whose lock no live process holds (the kernel drops the lock when its process dies, kill -9 included).
    A process that ends normally removes its own folder."""
    parent = Path(parent or tempfile.gettempdir())
    for old in parent.glob(f"{SCRATCH_PREFIX}*"):
        try:
            fd = os.open(old / ".lock", os.O_RDONLY)
        except OSError:  # no lock file (yet, or an older layout): leave it
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live actor's
            continue
        finally:
            os.close(fd)
        shutil.rmtree(old, ignore_errors=True)
    # Locked before it gets a name another actor's sweep would match.
    new = Path(tempfile.mkdtemp(prefix=f".{SCRATCH_PREFIX}new-", dir=parent))
    fd = os.open(new / ".lock", os.O_RDONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until this process ends
    scratch = parent / f"{SCRATCH_PREFIX}{new.name.rsplit('-', 1)[-1]}"
    new.rename(scratch)
    atexit.register(shutil.rmtree, scratch, True)  # a process that ends normally removes its own
    return scratch, fd


class PluginActor:
    """Runs inside a Ray worker process: the plugins stay loaded between jobs."""

    def __init__(self, sections: Mapping[str, PluginSection], preload: list[str], log_level: str,
                 models_dir: Path | None, device: str, env: Mapping[str, str], gpu_decode: GpuDecode = False) -> None:
        os.environ.update(env)  # before anything initialises CUDA; Ray sets CUDA_VISIBLE_DEVICES of GPU actors
        from node.logs import setup_logging
        from node.run.heap import keep_freed_memory

        keep_freed_memory()  # the actor's process is its own: jobs reuse its pages, as local workers do

        setup_logging(log_level)
        self.plugins = PluginCache(sections, models_dir, device, gpu_decode)
        self.plugins.preload(preload)
        self.scratch, self._scratch_lock = claim_scratch()

    def where(self) -> dict:
        import ray

        node_id = ray.get_runtime_context().get_node_id()  # its address as the cluster knows it (ray start)
        ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id),
                  ray.util.get_node_ip_address())
        return {"node_ip": ip, "pid": os.getpid()}

    def rss_mb(self) -> int:
        return _rss_bytes(os.getpid()) // 2**20

    def run(self, spec: JobSpec, data: list[bytes] | None) -> dict:
        """Run one job. `data`: the bytes of the spec's series then priors files, in order (object store);
        None when the spec's paths are on the shared path. Never raises: errors go back as values."""
        started = time.time()
        job_dir = self.scratch / f"job-{spec.job_id}-{uuid.uuid4().hex[:8]}"
        timings: dict[str, float] = {}
        shipped = data is not None
        try:
            if shipped:
                t = time.perf_counter()
                spec = self._stage_in(spec, data, job_dir)  # type: ignore[arg-type]
                data = None  # the node keeps the object; this process need not hold a copy
                timings["ray_stage_in_s"] = time.perf_counter() - t
            t = time.perf_counter()
            out = execute_job(spec, self.plugins, lambda stage: None)
            timings["execute_s"] = time.perf_counter() - t
            blobs = None
            if shipped:  # the results are in this actor's scratch folder: they go back as bytes
                t = time.perf_counter()
                blobs = [Path(f.temp_path).read_bytes() for f in out.files]
                timings["ray_stage_out_s"] = time.perf_counter() - t
            timings["actor_s"] = time.time() - started
            return {"output": out, "files": blobs, "timings": timings, "started": started}
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the node
            log.debug("job failed traceback:\n%s", traceback.format_exc())
            return {"error": f"{type(exc).__name__}: {exc}", "out_of_memory": isinstance(exc, MemoryError)}
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)

    @staticmethod
    def _stage_in(spec: JobSpec, data: list[bytes], job_dir: Path) -> JobSpec:
        """Write the shipped files into this actor's scratch folder; the spec then names those copies."""
        blobs = iter(data)

        def place(group: dict[str, list[str]], kind: str) -> dict[str, list[str]]:
            out = {}
            for n, (series_uid, paths) in enumerate(group.items()):
                folder = job_dir / kind / str(n)
                folder.mkdir(parents=True)
                out[series_uid] = []
                for i, _ in enumerate(paths):
                    p = folder / f"{i:05d}.dcm"
                    p.write_bytes(next(blobs))
                    out[series_uid].append(str(p))
            return out

        (job_dir / "out").mkdir(parents=True)
        return dataclasses.replace(spec, series=place(spec.series, "series"), priors=place(spec.priors, "priors"),
                                   temp_dir=str(job_dir / "out"))


def _wait_for_head(section: RaySection) -> None:
    """Fail fast and clearly when nothing listens at the head's address: ray.init itself would retry for
    minutes with only Ray's own log lines to show for it."""
    if section.address == "auto":
        return
    host, _, port = section.address.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailable(f"run.ray.address {section.address!r} is not host:port (or 'auto')")
    deadline = time.monotonic() + section.connect_timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise RayUnavailable(f"cannot join the Ray cluster at run.ray.address {section.address!r}: {exc} "
                                     f"for {section.connect_timeout_s:g} s (run.ray.connect_timeout_s); is "
                                     "`ray start --head` running there?") from exc
            time.sleep(0.5)


class RayBackend:
    """The node's connection to the Ray cluster; makes one RayRunner per worker slot."""

    def __init__(self, section: RaySection, spool: Spool, node_ae: str) -> None:
        self.ray = _import_ray()
        self.section = section
        self.spool = spool
        self.node_ae = node_ae
        if section.data == "shared_path":
            shared = section.shared_path.resolve()  # type: ignore[union-attr] - the schema requires it
            if shared not in spool.root.resolve().parents and shared != spool.root.resolve():
                raise RayUnavailable(f"run.ray.data is shared_path but the spool ({spool.root}) is not under "
                                     f"run.ray.shared_path ({shared}): set storage.root inside it")
        _wait_for_head(section)
        try:
            self.ray.init(address=section.address, namespace=section.namespace, log_to_driver=True,
                          logging_level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - ConnectionError and Ray's own errors alike
            raise RayUnavailable(f"cannot join the Ray cluster at run.ray.address {section.address!r}: "
                                 f"{type(exc).__name__}: {exc} (is `ray start --head` running there?)") from exc
        self._actor_class = self.ray.remote(PluginActor)
        log.info("joined Ray cluster address=%s namespace=%s resources=%s", section.address, section.namespace,
                 self.ray.cluster_resources())

    def runners(self, sections: Mapping[str, PluginSection], log_level: str, models_dir: Path | None,
                device: str, gpu_decode: GpuDecode = False) -> Callable[[WorkerSlot, list[str]], "RayRunner"]:
        """A WorkerPool runner factory: (slot, plugins to preload) -> RayRunner. `gpu_decode`: run.gpu_decode."""
        per_gpu: dict[int, int] = {}

        def make(slot: WorkerSlot, preload: list[str]) -> RayRunner:
            if slot.gpu is not None and slot.gpu.index not in per_gpu:
                per_gpu[slot.gpu.index] = 0
            if slot.gpu is not None:
                per_gpu[slot.gpu.index] += 1
            return RayRunner(self, slot, dict(sections), preload, log_level, models_dir, device, per_gpu, gpu_decode)

        return make

    def close(self) -> None:
        self.ray.shutdown()


class RayRunner:
    """One warm Ray actor with the PluginProcess interface (start/stop/restart/kill/ready/run)."""

    def __init__(self, backend: RayBackend, slot: WorkerSlot, sections: dict, preload: list[str], log_level: str,
                 models_dir: Path | None, device: str, per_gpu: Mapping[int, int], gpu_decode: GpuDecode = False) -> None:
        self.backend = backend
        self.ray = backend.ray
        self.slot = slot
        self._per_gpu = per_gpu  # slots per GPU, filled in as the pool makes its runners
        # A GPU actor gets its GPU from Ray (Ray sets CUDA_VISIBLE_DEVICES); a CPU actor is kept off the GPU.
        env = {k: v for k, v in slot.env.items() if not (slot.gpu is not None and k == "CUDA_VISIBLE_DEVICES")}
        self._args = (sections, list(preload), log_level, models_dir, device, env, gpu_decode)
        self._actor = None
        self._ready_ref = None
        self._where: dict | None = None
        self._started_at = 0.0
        self._warned = False

    @property
    def num_gpus(self) -> float:
        """A GPU slot's share of its GPU: 1/k with run.gpu.slots_per_gpu k, so Ray packs k actors per GPU."""
        return 0.0 if self.slot.gpu is None else 1.0 / max(1, self._per_gpu.get(self.slot.gpu.index, 1))

    @property
    def name(self) -> str:
        where = f"@{self._where['node_ip']}" if self._where else ""
        return f"ray:{self.slot.name}{where}"

    @property
    def pid(self) -> int | None:
        return self._where["pid"] if self._where else None

    def start(self) -> None:
        s = self.backend.section
        actor_name = f"{self.backend.node_ae}-{self.slot.name}-{uuid.uuid4().hex[:6]}"
        self._actor = self.backend._actor_class.options(
            name=actor_name, num_cpus=s.num_cpus, num_gpus=self.num_gpus, max_concurrency=2, max_restarts=0,
        ).remote(*self._args)
        self._ready_ref = self._actor.where.remote()
        self._where = None
        self._started_at = time.monotonic()
        self._warned = False

    def ready(self, timeout: float) -> bool:
        """True once the actor runs (placed, plugins loaded); False while Ray still schedules it. A slot
        claims no job before, so a job never waits on a cluster without room for its actor."""
        if self._where is not None:
            return True
        if self._actor is None:
            self.start()
        done, _ = self.ray.wait([self._ready_ref], timeout=timeout)
        if not done:
            waited = time.monotonic() - self._started_at
            if waited > PENDING_WARN_S and not self._warned:
                self._warned = True
                log.warning("Ray actor not placed after %.0f s worker=%s num_cpus=%g num_gpus=%g: the cluster has no "
                            "room for it (see `ray status`; run.ray.num_cpus, run.workers, run.gpu.slots_per_gpu)",
                            waited, self.slot.name, self.backend.section.num_cpus, self.num_gpus)
            return False
        try:
            self._where = self.ray.get(self._ready_ref)
        except Exception as exc:  # noqa: BLE001 - e.g. the actor's constructor failed: try a fresh one
            log.error("Ray actor failed to start worker=%s error=%s", self.slot.name, f"{type(exc).__name__}: {exc}")
            self.kill()
            time.sleep(min(timeout, 1.0))
            self.start()
            return False
        log.info("Ray actor ready worker=%s node_ip=%s pid=%s num_cpus=%g num_gpus=%g", self.slot.name,
                 self._where["node_ip"], self._where["pid"], self.backend.section.num_cpus, self.num_gpus)
        return True

    def kill(self) -> None:
        if self._actor is not None:
            try:
                self.ray.kill(self._actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone, or the cluster is gone
                pass
        self._actor = self._ready_ref = self._where = None

    def stop(self, timeout: float = 5.0) -> None:
        self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def run(self, spec: JobSpec, *, timeout_s: float, memory_limit_mb: int,
            on_stage: Callable[[str], None], abandon: Callable[[], bool],
            next_job: Callable[[], JobSpec | None] | None = None) -> JobOutput:
        """Run `spec` on the actor. `next_job` (prefetch) is not used on Ray."""
        from ray.exceptions import RayActorError, RayError

        if self._actor is None:
            self.start()
        deadline = time.monotonic() + timeout_s
        timings: dict[str, float] = {}
        t = time.perf_counter()
        data_ref = None
        if self.backend.section.data == "object_store":
            try:
                blobs = [Path(p).read_bytes() for group in (spec.series, spec.priors)
                         for paths in group.values() for p in paths]
            except OSError as exc:
                raise JobFailed(f"cannot read the job's input: {exc}") from exc
            data_ref = self.ray.put(blobs)
            timings["ray_input_mb"] = round(sum(map(len, blobs)) / 2**20, 2)
            del blobs
        timings["ray_send_s"] = time.perf_counter() - t
        on_stage("ray")
        submitted = time.time()
        ref = self._actor.run.remote(spec, data_ref)
        next_rss = time.monotonic() + MEMORY_POLL_S
        rss_ref = None
        try:
            while True:
                done, _ = self.ray.wait([ref], timeout=WAIT_POLL_S)
                if done:
                    break
                if time.monotonic() > deadline:
                    self.kill()
                    raise JobFailed(f"timed out after {timeout_s:g} s (run.timeout_s); Ray actor stopped",
                                    restart=True)
                if abandon():
                    self.kill()
                    raise Abandoned()
                if rss_ref is not None and self.ray.wait([rss_ref], timeout=0)[0]:
                    try:
                        rss = self.ray.get(rss_ref)
                    except RayError:
                        rss = 0  # the actor is gone: `ref` says how
                    rss_ref = None
                    if rss > memory_limit_mb:
                        self.kill()
                        raise JobFailed(f"Ray actor used {rss} MB, over run.memory_limit_mb ({memory_limit_mb} MB); "
                                        "stopped", restart=True)
                if rss_ref is None and time.monotonic() >= next_rss:
                    rss_ref = self._actor.rss_mb.remote()
                    next_rss = time.monotonic() + MEMORY_POLL_S
            try:
                reply = self.ray.get(ref)
            except RayActorError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise JobFailed(f"Ray actor died ({first})", restart=True) from exc
            except RayError as exc:
                raise JobFailed(f"Ray error: {type(exc).__name__}: {exc}", restart=True) from exc
        finally:
            del data_ref
        returned = time.time()
        if "error" in reply:
            raise JobFailed(reply["error"], restart=reply["out_of_memory"])
        out: JobOutput = reply["output"]
        actor = reply["timings"]
        if reply["files"] is not None:
            t = time.perf_counter()
            out.files = self._receive(out.files, reply["files"])
            timings["ray_receive_s"] = time.perf_counter() - t
        # Time in Ray itself: scheduling, argument and result transfer (clocks of two machines: approximate).
        timings["ray_queue_s"] = max(0.0, (returned - submitted) - actor["actor_s"])
        timings["ray_stage_s"] = actor.get("ray_stage_in_s", 0.0) + actor.get("ray_stage_out_s", 0.0)
        timings["ray_overhead_s"] = (timings["ray_send_s"] + timings["ray_queue_s"] + timings["ray_stage_s"]
                                     + timings.get("ray_receive_s", 0.0))
        out.timings.update({k: round(v, 3) for k, v in timings.items()})
        return out

    def _receive(self, files: list[BuiltFile], blobs: list[bytes]) -> list[BuiltFile]:
        """Write the actor's result files as synced spool temp files, which WorkerPool._commit then moves."""
        spool = self.backend.spool
        written: list[BuiltFile] = []
        try:
            for f, data in zip(files, blobs):
                tmp = spool.temp_path()
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                written.append(dataclasses.replace(f, temp_path=str(tmp)))
        except BaseException:
            for f in written:
                Path(f.temp_path).unlink(missing_ok=True)
            raise
        return written

