"""ct_nodule: lung nodules on chest CT with the bundled 3-D U-Net (model package models/ct_nodule/).

Demonstration model trained on synthetic data only: not for clinical use.

run: the largest series → body crop, HU window, resampling to the manifest's spacing (on the device) →
batched sliding-window inference (mixed precision on CUDA; the same function in float32 on CPU; on CUDA
out-of-memory the batch is halved and the study run again) → threshold, connected components, tiny ones
dropped, each nodule resampled back to the source grid and measured there → one SEG segment and one
TID 1500 finding per nodule (longest diameter, volume, lung side, certainty; centroid in the tracking id).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
import torch

from node.models.runtime import load_network
from node.plugin_api import (
    Accepts,
    Code,
    Finding,
    Measurement,
    Plugin,
    PluginResult,
    Resources,
    Segment,
    Segmentation,
    SeriesVolume,
    StudyInput,
)
from plugins.ct_nodule import infer
from plugins.ct_nodule.post import Nodule, affine, extract_nodules

log = logging.getLogger(__name__)

MORPHOLOGICALLY_ABNORMAL = Code("49755003", "SCT", "Morphologically abnormal structure")
NODULE = Code("27925004", "SCT", "Nodule")
RIGHT_LUNG = Code("3341006", "SCT", "Right lung")
LEFT_LUNG = Code("44029006", "SCT", "Left lung")
LONG_AXIS = Code("103339001", "SCT", "Long axis")  # CID 7470 linear measurement: the longest diameter
VOLUME = Code("118565006", "SCT", "Volume")
MM = Code("mm", "UCUM", "millimeter")
MM3 = Code("mm3", "UCUM", "cubic millimeter")

DEFAULT_BATCH = {"cuda": 8, "cpu": 2}


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class CtNodulePlugin(Plugin):
    name = "ct_nodule"
    version = "0.1.0"
    accepts = Accepts(modalities=("CT",), min_slices=20)
    # GPU memory: CUDA context (~500 MB) + a 300x512x512 series in float32 (~315 MB) + the model grid and
    # its probability maps (~150 MB) + a batch of 8 patches of 64^3 (~400 MB of activations) + cuDNN
    # workspace. Host memory: the series, its float copy and the masks.
    resources = Resources(gpu=True, memory_mb=3072, gpu_memory_mb=2048)
    model_name = "ct_nodule"
    model_version = "0.1.0"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        super().__init__(options)
        self.net: Any = None
        self.last_batch_size: int | None = None

    # -- model ---------------------------------------------------------------------------------------
    def load_model(self, model: Any) -> None:
        super().load_model(model)
        m = model.manifest
        self.spacing = tuple(float(v) for v in m.input.spacing_mm)
        self.patch = tuple(int(v) for v in m.input.patch_size)
        self.hu_window = tuple(float(v) for v in m.input.hu_window)
        label = m.labels[0]
        self.category = Code(label.category.value, label.category.scheme, label.category.meaning)
        self.type = Code(label.type.value, label.type.scheme, label.type.meaning)
        self.net = load_network(model, self.device)  # TorchScript or ONNX, as the manifest says

    # -- run -----------------------------------------------------------------------------------------
    def _series(self, study: StudyInput) -> SeriesVolume:
        if not study.series:
            raise ValueError(f"study {study.study_uid}: no series given to ct_nodule")
        vol = max(study.series, key=lambda s: s.pixels.shape[0])
        if vol.pixels.shape[0] < self.accepts.min_slices:
            raise ValueError(f"series {vol.series_uid}: {vol.pixels.shape[0]} slices, "
                             f"ct_nodule needs at least {self.accepts.min_slices}")
        return vol

    def prepare(self, study: StudyInput) -> infer.Prepared:
        """Body crop, HU window and resampling on the host, while the worker's previous study infers."""
        if self.net is None:
            raise RuntimeError("ct_nodule: no model loaded (the node calls load_model before prepare)")
        vol = self._series(study)
        with torch.no_grad():
            return infer.prepare(vol.pixels, vol.spacing, self.spacing, self.hu_window, "cpu")

    def run(self, study: StudyInput) -> PluginResult:
        if self.net is None:
            raise RuntimeError("ct_nodule: no model loaded (the node calls load_model before run)")
        vol = self._series(study)
        device = self.device
        is_cuda = torch.device(device).type == "cuda"
        if is_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        amp = infer.amp_for(device)
        batch = int(self.options.get("batch_size", DEFAULT_BATCH["cuda" if is_cuda else "cpu"]))
        batch = max(1, int(batch * study.batch_scale))  # the node halves the scale after an out-of-memory error
        threshold = float(self.options.get("threshold", 0.5))
        min_volume = float(self.options.get("min_volume_mm3", 15.0))

        t0 = time.perf_counter()
        if isinstance(study.prepared, infer.Prepared):
            prep = dataclasses.replace(study.prepared, image=study.prepared.image.to(device))
        else:
            prep = infer.prepare(vol.pixels, vol.spacing, self.spacing, self.hu_window, device)
        _sync(device)
        t1 = time.perf_counter()

        def whole_study(batch_size: int) -> torch.Tensor:
            prob = infer.predict_volume(self.net, prep.image, self.patch, batch_size, amp, edge_pad=prep.edge_pad)
            _sync(device)
            return prob

        def retry(new_batch: int, exc: BaseException) -> None:
            log.warning("ct_nodule: CUDA out of memory on %s; running the study again with batch size %d",
                        device, new_batch)

        prob, self.last_batch_size = infer.with_oom_backoff(whole_study, batch, retry)
        t2 = time.perf_counter()
        nodules = extract_nodules(prob, prep, vol.pixels.shape, affine(vol.origin, vol.orientation, vol.spacing),
                                  threshold=threshold, min_volume_mm3=min_volume)
        result = self._result(vol, nodules, prep)
        t3 = time.perf_counter()
        timings = {"preprocess_s": round(t1 - t0, 4), "inference_s": round(t2 - t1, 4),
                   "postprocess_s": round(t3 - t2, 4)}
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if is_cuda else None
        return PluginResult(findings=result[0], segmentations=result[1], summary=result[2], timings=timings,
                            gpu_memory_peak_mb=peak)

    def _result(self, vol: SeriesVolume, nodules: list[Nodule], prep: infer.Prepared):
        if not nodules:
            return [], [], "No lung nodule found (ct_nodule 0.1.0, demonstration model, not for clinical use)"
        midline_x = self._midline_x(vol, prep)
        findings, segments, lines = [], [], []
        for i, n in enumerate(nodules, start=1):
            label = f"Nodule {i}"
            x, y, z = n.centroid_patient
            site = LEFT_LUNG if x > midline_x else RIGHT_LUNG  # LPS: +x is the patient's left
            # The nodule's box, not a mask the size of the series (Segment.offset).
            segments.append(Segment(label, n.mask, self.category, self.type,
                                    offset=tuple(int(b.start) for b in n.mask_box)))
            findings.append(Finding(
                tracking_id=f"Nodule {i} at ({x:.1f}, {y:.1f}, {z:.1f}) mm LPS",
                finding_type=NODULE,
                measurements=[Measurement(LONG_AXIS, round(n.longest_diameter_mm, 1), MM),
                              Measurement(VOLUME, round(n.volume_mm3, 1), MM3)],
                finding_site=site,
                confidence=round(n.confidence, 4),
                segment_label=label,
            ))
            lines.append(f"{label}: {site.meaning.lower()}, {n.longest_diameter_mm:.1f} mm, "
                         f"{n.volume_mm3:.0f} mm3, centre ({x:.1f}, {y:.1f}, {z:.1f}) mm, "
                         f"certainty {100 * n.confidence:.0f}%")
        summary = (f"{len(nodules)} lung nodule candidate(s) (ct_nodule 0.1.0, demonstration model, "
                   "not for clinical use). " + "; ".join(lines))
        return findings, [Segmentation(vol.series_uid, segments)], summary

    @staticmethod
    def _midline_x(vol: SeriesVolume, prep: infer.Prepared) -> float:
        """Patient x of the centre of the body crop: the mediastinum lies there, left lung beyond it."""
        centre = np.array([(s.start + s.stop - 1) / 2 for s in prep.box] + [1.0])
        return float((affine(vol.origin, vol.orientation, vol.spacing) @ centre)[0])
