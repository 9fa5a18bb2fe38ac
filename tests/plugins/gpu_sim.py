"""Plugins that exercise GPU scheduling, out-of-memory retry and prefetch on a machine without a GPU."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch

from node.plugin_api import Plugin, PluginResult, Resources, StudyInput


class SleepGpuPlugin(Plugin):
    """Declares a GPU need; sleeps `options.seconds`; reports the GPU its worker was given."""

    name, version = "sleep_gpu", "1"
    resources = Resources(gpu=True, gpu_memory_mb=100)

    def run(self, study: StudyInput) -> PluginResult:
        time.sleep(float(self.options.get("seconds", 2)))
        return PluginResult(summary=f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r} "
                                    f"threads={torch.get_num_threads()}")


class OomPlugin(Plugin):
    """Raises CUDA out-of-memory while the batch scale is above `options.fits_at` (0: never fits)."""

    name, version = "oom", "1"
    resources = Resources(gpu=True, gpu_memory_mb=100)

    def run(self, study: StudyInput) -> PluginResult:
        if study.batch_scale > float(self.options.get("fits_at", 0.5)) or not self.options.get("fits_at", 0.5):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return PluginResult(summary=f"ran at batch scale {study.batch_scale:g}")


class PrefetchProbePlugin(Plugin):
    """Has a `prepare` step; reports whether it ran ahead, in another thread, while the previous job ran."""

    name, version = "prefetch_probe", "1"

    def prepare(self, study: StudyInput) -> dict:
        empty = not any(study.scratch_dir.iterdir())
        (study.scratch_dir / "staged.raw").write_bytes(b"\0" * 4096)  # as a plugin staging its input would
        return {"thread": threading.current_thread().name, "at": time.time(),
                "slices": sum(s.pixels.shape[0] for s in study.series), "scratch": str(study.scratch_dir),
                "scratch_empty": empty}

    def run(self, study: StudyInput) -> PluginResult:
        started = time.time()
        time.sleep(float(self.options.get("seconds", 2)))
        p = study.prepared
        return PluginResult(summary=f"prepared_in={p['thread']} ahead_s={started - p['at']:.2f} slices={p['slices']} "
                                    f"prepare_scratch={p['scratch']} empty={p['scratch_empty']} "
                                    f"left={Path(p['scratch']).exists()}")
