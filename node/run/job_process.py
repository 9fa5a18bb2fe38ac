"""What a worker process does for one job: load the series, run the plugin, build and validate results.

It runs in a child process of the node (see plugin_process.py), so a plugin that hangs, exhausts
memory or crashes the interpreter takes down only this process and fails only its own job. Results
are written as synced temp files; the node commits them and records the state change.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from node.config.schema import BUNDLED_MODELS, PluginSection
from node.models import load_model
from node.monitor.stats import output_stats
from node.plugin_api import Plugin, PluginResult, SeriesVolume, StudyInput, load_plugin
from node.receive.spool import scratch_prefix
from node.results.build import AlgorithmInfo, BuiltObject, SrBuilder, build_results
from node.results.fallback import build_fallbacks
from node.results.validate import PendingValidation, start_dciodvfy
from node.run import gpu_decode
from node.run.read_ahead import ReadAhead
from node.run.series_loader import load_series

log = logging.getLogger("ainode.run")


MIN_BATCH_SCALE = 1 / 8


class JobError(Exception):
    pass


@dataclass(frozen=True)
class JobSpec:
    job_id: int
    study_uid: str
    plugin: str
    series: dict[str, list[str]]  # series UID -> instance file paths
    temp_dir: str  # where result temp files and the plugin's scratch folder go (the spool's temp folder,
    # reaped after a crash)
    validate: bool
    priors: dict[str, list[str]] = field(default_factory=dict)  # prior series UID -> files (rule's `priors:`)
    # Viewer fallbacks some destination of the job needs instead of SEG ("GSPS", "SC"), and how many key
    # images per finding.
    fallbacks: frozenset[str] = frozenset()
    max_key_images: int = 1


@dataclass(frozen=True)
class BuiltFile:
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    temp_path: str


@dataclass
class JobOutput:
    plugin_name: str
    plugin_version: str
    summary: str
    files: list[BuiltFile]
    timings: dict[str, float] = field(default_factory=dict)
    model: dict | None = None  # name, version, weights sha256 and package digest of the model used
    stats: dict | None = None  # structured outputs for model monitoring (node/monitor/stats.py)


class PluginCache:
    """Plugins loaded once per worker process and kept warm between jobs, with their verified models."""

    def __init__(self, sections: Mapping[str, PluginSection], models_dir: Path | None = None,
                 device: str = "auto", gpu_decode: gpu_decode.Setting = False) -> None:
        """`gpu_decode`: run.gpu_decode, for the plugins that run on a GPU (node/run/gpu_decode.py): True, or
        "auto" where nvImageCodec is installed (else said at INFO, not as a warning)."""
        self.sections = sections
        self.models_dir = models_dir
        self.device = device
        self.gpu_decode = gpu_decode
        self.gpu_decode_off: str | None = None  # why run.gpu_decode could not be used, when it could not
        self._plugins: dict[str, Plugin] = {}

    def _device_for(self, plugin: Plugin) -> str:
        if not plugin.resources.gpu or self.device == "cpu":
            return "cpu"
        import torch

        if torch.cuda.is_available():
            return "cuda:0"  # the worker process sees only its own GPU (CUDA_VISIBLE_DEVICES)
        if self.device == "cuda":
            raise RuntimeError("run.device is cuda, but no CUDA GPU is visible to the worker")
        return "cpu"

    def preload(self, names: list[str]) -> None:
        """Load the plugins a worker will run, and what the results build reads on first use (highdicom's
        tables of the standard, about 1 s), so that neither counts in the first job's time."""
        for name in names:
            try:
                self.get(name)
            except Exception as exc:  # noqa: BLE001 - reported again when a job needs the plugin
                log.error("plugin failed to load plugin=%s error=%s", name, f"{type(exc).__name__}: {exc}")
        if names:
            from node.results import iod_lookup

            iod_lookup.preload()

    def loaded(self, name: str) -> Plugin | None:
        return self._plugins.get(name)

    def get(self, name: str) -> Plugin:
        if name not in self._plugins:
            section = self.sections.get(name)
            plugin = load_plugin(name, section.options if section else None, section.entry if section else None)
            plugin.device = self._device_for(plugin)
            if self.gpu_decode is not False and plugin.device != "cpu":
                if why := gpu_decode.enable(plugin.device):
                    self.gpu_decode_off = why
                    log.log(logging.WARNING if self.gpu_decode is True else logging.INFO,
                            "run.gpu_decode is %s but slices are decoded on the CPU plugin=%s reason=%s",
                            "on" if self.gpu_decode is True else "auto", name, why)
                else:
                    log.info("slices are decoded on the GPU plugin=%s device=%s", name, plugin.device)
            if plugin.model_name:
                version = (section.model_version if section else None) or plugin.model_version
                plugin.load_model(load_model(self.models_dir or BUNDLED_MODELS, plugin.model_name, version))
            self._plugins[name] = plugin
        return self._plugins[name]


@dataclass
class LoadedInput:
    """A job's decoded series (and the plugin's `prepare` output), possibly made ahead of time."""

    job_id: int
    series: dict[str, list[str]]
    volumes: list
    sources: dict
    prepared: Any
    timings: dict[str, float]
    priors: list = field(default_factory=list)  # SeriesVolumes of the prior studies


def load_priors(series: Mapping[str, list[str]], decode_processes: int | None = None, nice: int = 0) -> list:
    """Prior series as volumes; one that cannot be read as a volume (a scout, a report) is left out, not fatal."""
    out = []
    for series_uid, paths in series.items():
        try:
            out.append(load_series(paths, decode_processes=decode_processes, nice=nice)[0])
        except Exception as exc:  # noqa: BLE001 - a prior is extra input: the job goes on without it
            log.warning("prior series left out series=%s error=%s", series_uid, f"{type(exc).__name__}: {exc}")
    return out


def job_scratch(spec: JobSpec) -> tempfile.TemporaryDirectory[str]:
    """An empty folder for the plugin (StudyInput.scratch_dir), in the spool's temp folder and named for the
    job (scratch_prefix), so the node also removes one that a killed process left behind."""
    return tempfile.TemporaryDirectory(prefix=scratch_prefix(spec.job_id), dir=spec.temp_dir)


def run_prepare(plugin: Plugin, spec: JobSpec, volumes: Sequence[SeriesVolume],
                priors: Sequence[SeriesVolume]) -> Any:
    """The plugin's `prepare` for `spec`'s study, with a scratch folder of its own (job_scratch; not the
    system's temp folder, where image data a plugin staged would stay, outside the node's clean-up), deleted
    when `prepare` returns."""
    with job_scratch(spec) as scratch:
        return plugin.prepare(StudyInput(spec.study_uid, volumes, Path(scratch), plugin.options, priors=priors))


def load_input(spec: JobSpec, plugin: Plugin | None, ahead: ReadAhead | None = None,
               decode_processes: int | None = None, nice: int = 0) -> LoadedInput:
    """Decode the job's series into volumes and run the plugin's `prepare` (when `plugin` is given). Files
    `ahead` read while the study arrived are taken from it. `decode_processes`, `nice`: as for load_series."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if ahead is not None and (held := sum(ahead.holds(paths) for paths in spec.series.values())):
        timings["read_ahead_files"] = held  # of the series' files, read while the study arrived
    volumes, sources = [], {}
    for series_uid, paths in spec.series.items():
        vol, headers = load_series(paths, ahead, decode_processes, nice)
        volumes.append(vol)
        sources[series_uid] = headers
    timings["load_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    priors = load_priors(spec.priors, decode_processes, nice)
    if spec.priors:
        timings["priors_load_s"] = round(time.perf_counter() - t, 3)
    prepared = None
    if plugin is not None:
        t = time.perf_counter()
        prepared = run_prepare(plugin, spec, volumes, priors)
        timings["prepare_s"] = round(time.perf_counter() - t, 3)
    return LoadedInput(spec.job_id, dict(spec.series), volumes, sources, prepared, timings, priors)


def is_cuda_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return "CUDA out of memory" in str(exc)


def _free_gpu_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_plugin(plugin: Plugin, study: StudyInput, timings: dict[str, float]) -> PluginResult:
    """Run the plugin; after a CUDA out-of-memory error, free the GPU's cache and run the study again at half
    the batch scale, down to MIN_BATCH_SCALE. The worker keeps serving either way."""
    scale = 1.0
    while True:
        try:
            return plugin.run(dataclasses.replace(study, batch_scale=scale))
        except Exception as exc:  # noqa: BLE001 - only CUDA out-of-memory is retried
            if not is_cuda_oom(exc):
                raise
            _free_gpu_memory()
            timings["oom_retries"] = timings.get("oom_retries", 0) + 1
            if scale / 2 < MIN_BATCH_SCALE:
                raise JobError(f"CUDA out of memory even at batch scale {scale:g} (plugin {plugin.name}); lower "
                               f"run.gpu.slots_per_gpu or raise plugins.{plugin.name}.gpu_memory_mb") from exc
            scale /= 2
            timings["batch_scale"] = scale
            log.warning("CUDA out of memory; running the study again plugin=%s batch_scale=%g", plugin.name, scale)


def execute_job(spec: JobSpec, plugins: PluginCache, stage: Callable[[str], None],
                loaded: LoadedInput | None = None, sr_builder: SrBuilder | None = None,
                ahead: ReadAhead | None = None) -> JobOutput:
    """Run one job. `loaded` is its input if it was prefetched while the previous job ran; `sr_builder`
    builds the SR in another process while this one builds the SEG; `ahead` holds files read while the
    study arrived."""
    timings: dict[str, float] = {}
    plugin = plugins.get(spec.plugin)

    stage("load")
    if loaded is None:
        loaded = load_input(spec, plugin, ahead)
    else:
        timings["prefetched"] = 1
        if spec.priors and not loaded.priors:  # fetched after the hint, so not in the prefetched input
            loaded.priors = load_priors(spec.priors)
        if "prepare_s" not in loaded.timings:  # the plugin was not loaded yet when the input was prefetched
            t = time.perf_counter()
            loaded.prepared = run_prepare(plugin, spec, loaded.volumes, loaded.priors)
            loaded.timings["prepare_s"] = round(time.perf_counter() - t, 3)
    timings.update(loaded.timings)
    volumes, sources = loaded.volumes, loaded.sources

    stage("plugin")
    t = time.perf_counter()
    with job_scratch(spec) as scratch:
        result = _run_plugin(plugin, StudyInput(spec.study_uid, volumes, Path(scratch), plugin.options,
                                                prepared=loaded.prepared, priors=loaded.priors), timings)
    timings["plugin_s"] = round(time.perf_counter() - t, 3)
    keep = {v.series_uid: v for v in volumes} if "SC" in spec.fallbacks else None  # pixels for key images
    del volumes, loaded

    stage("build")
    t = time.perf_counter()
    model = plugin.model
    algorithm = AlgorithmInfo(name=plugin.name, version=plugin.version,
                              model_name=model.name if model else None, model_version=model.version if model else None,
                              weights_sha256=model.weights_sha256 if model else None,
                              not_for_clinical_use=bool(model and model.manifest.not_for_clinical_use))
    timings.update({k: round(float(v), 3) for k, v in result.timings.items()})
    if result.gpu_memory_peak_mb is not None:
        timings["gpu_memory_peak_mb"] = round(result.gpu_memory_peak_mb, 1)
    files: list[BuiltFile] = []
    checks: list[tuple[str, str, PendingValidation]] = []  # kind, SOP instance UID, its dciodvfy run

    def temp_file(kind: str, sop_uid: str) -> Path:
        return Path(spec.temp_dir) / f"job{spec.job_id}-{kind}-{sop_uid}.part"

    def write(o: BuiltObject) -> None:  # written, and its validation started, while the next object is built
        tmp = temp_file(o.kind, o.sop_instance_uid)
        if o.path is None:
            o.dataset.save_as(tmp, enforce_file_format=True)  # type: ignore[union-attr] - no path: a dataset
        elif o.path != tmp:
            raise JobError(f"{o.kind} {o.sop_instance_uid} was written to {o.path}, not {tmp}")
        files.append(BuiltFile(o.kind, o.sop_class_uid, o.sop_instance_uid, o.series_instance_uid, str(tmp)))
        if spec.validate:
            checks.append((o.kind, o.sop_instance_uid, start_dciodvfy(tmp)))

    try:
        build_results(result, sources, algorithm, on_built=write, sr_builder=sr_builder,
                      sr_file=lambda uid: temp_file("SR", uid))
        if spec.fallbacks:
            for o in build_fallbacks(result, sources, algorithm, spec.fallbacks, volumes=keep,
                                     max_key_images=spec.max_key_images):
                write(o)
            del keep
        timings["build_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        for kind, uid, check in checks:  # every object passes dciodvfy before any is handed on
            errors = check.errors()
            if errors:
                raise JobError(f"{kind} {uid} failed IOD validation: {errors[0]}"
                               + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
        if spec.validate:
            timings["validate_s"] = round(time.perf_counter() - t, 3)  # beyond what overlapped the build
    except BaseException:
        for _, _, check in checks:
            check.cancel()
        for f in files:
            Path(f.temp_path).unlink(missing_ok=True)
        raise
    provenance = {"model": model.name, "model_version": model.version, "weights_sha256": model.weights_sha256,
                  "package_digest": model.digest} if model else None
    stats = output_stats(result, sources, spec.plugin, plugin.version, provenance)  # config name: a shadow copy differs
    return JobOutput(plugin.name, plugin.version, result.summary, files, timings, provenance, stats)
