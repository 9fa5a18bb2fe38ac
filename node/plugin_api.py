"""The contract between the node and an analysis plugin.

A plugin sees plain numpy volumes and returns plain data. It never builds DICOM
and never touches the network: the node owns every object that leaves it, so a
plugin author cannot produce an SR that lands in the wrong study.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from pydicom.dataset import Dataset

ENTRY_POINT_GROUP = "ainode.plugins"


@dataclass(frozen=True)
class Code:
    """A coded concept (value, scheme designator, meaning), e.g. ("39607008", "SCT", "Lung")."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class SeriesVolume:
    """One series as a 3-D array in physical units (HU for CT).

    Axis order is (slice, row, column). Slices are sorted along the normal of
    the image plane, so `sop_instance_uids[k]` and `headers[k]` describe
    `pixels[k]`.
    """

    series_uid: str
    modality: str
    pixels: np.ndarray  # float32, shape (slices, rows, cols)
    spacing: tuple[float, float, float]  # (slice, row, column) in mm
    origin: tuple[float, float, float]  # ImagePositionPatient of the first slice
    orientation: tuple[float, float, float, float, float, float]  # ImageOrientationPatient
    sop_instance_uids: tuple[str, ...]
    headers: Sequence[Dataset]  # read-only, pixel data removed

    @property
    def voxel_volume_mm3(self) -> float:
        return float(self.spacing[0] * self.spacing[1] * self.spacing[2])


@dataclass(frozen=True)
class StudyInput:
    study_uid: str
    series: Sequence[SeriesVolume]
    # An empty folder for this job alone, on the spool's disk; deleted when the job ends, also when the
    # node kills its process (run.timeout_s, run.memory_limit_mb). `prepare` gets a folder of its own there,
    # deleted when it returns: hand what `run` needs back as its return value.
    scratch_dir: Path
    options: Mapping[str, Any] = field(default_factory=dict)
    # What the plugin's `prepare` returned for this study (None if it has none). The node may have called
    # it in the background while the worker was still running the previous job.
    prepared: Any = None
    # Multiply your batch size by this (at least 1). The node runs the study again at half the scale after
    # a CUDA out-of-memory error, so one oversized study fails neither itself nor the worker.
    batch_scale: float = 1.0
    # The patient's prior studies when the rule asks for them (`priors:`), newest study first; empty when it
    # does not or none could be fetched. Each volume's headers give its StudyInstanceUID and StudyDate.
    # `prepare` may run before they are fetched (while the previous job runs) and then sees none.
    priors: Sequence[SeriesVolume] = ()


@dataclass(frozen=True)
class Measurement:
    """A numeric measurement with a UCUM unit, e.g. Volume in mL."""

    concept: Code
    value: float
    unit: Code  # scheme "UCUM"


@dataclass(frozen=True)
class Finding:
    """One finding: becomes one TID 1500 measurement group.

    `segment_label` links the finding to a segment of a `Segmentation` in the
    same result, so the SR can reference the SEG segment it was measured on.
    """

    tracking_id: str
    finding_type: Code
    measurements: Sequence[Measurement] = ()
    finding_site: Code | None = None
    confidence: float | None = None  # 0..1
    segment_label: str | None = None


@dataclass(frozen=True)
class Segment:
    """One segment's voxels. `mask` has the source SeriesVolume.pixels' shape, or with `offset` it is a box
    of it: mask[0, 0, 0] lies at (slice, row, column) `offset` of the series. A small structure (a nodule)
    is best given as its box: the node then never scans or copies a mask the size of the series (four
    nodules of a 300-slice CT: 315 MB to zero and scan, about 0.06 s of each job)."""

    label: str
    mask: np.ndarray  # bool
    category: Code  # e.g. SCT 91723000 "Anatomical Structure"
    type: Code  # e.g. SCT 44029006 "Left lung"
    offset: tuple[int, int, int] | None = None  # (slice, row, column) of mask[0, 0, 0]; None: the whole series

    def shape_error(self, shape: tuple[int, int, int], series_uid: str) -> str | None:
        """Why this segment does not fit a series of `shape` (slices, rows, columns), or None."""
        mask_shape = tuple(np.shape(self.mask))
        if self.offset is None:
            if mask_shape != tuple(shape):
                return (f"segment '{self.label}' mask has shape {mask_shape} but series {series_uid} is "
                        f"{tuple(shape)} (slices, rows, columns); give the whole series' shape, or a box with offset")
            return None
        try:
            parts: tuple | None = tuple(self.offset)
        except TypeError:  # a single number, say
            parts = None
        if parts is None or len(parts) != 3 or not all(isinstance(o, (int, np.integer)) and not isinstance(o, bool)
                                                       for o in parts):
            # int() would cut 2.7 to 2 and put the segment a voxel off, or fail on "2" naming nothing.
            return (f"segment '{self.label}': offset {self.offset!r} must be three whole numbers "
                    f"(slice, row, column) of where mask[0, 0, 0] lies in series {series_uid}")
        if len(mask_shape) != 3 or any(o < 0 or o + n > m for o, n, m in zip(parts, mask_shape, shape)):
            return (f"segment '{self.label}': a mask of shape {mask_shape} at offset {parts} does not "
                    f"lie inside series {series_uid} of {tuple(shape)} (slices, rows, columns)")
        return None

    def full_mask(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The mask over the whole series (a new array where the segment is a box)."""
        if self.offset is None:
            return np.asarray(self.mask, dtype=bool)
        out = np.zeros(shape, dtype=bool)
        out[self.box()] = self.mask
        return out

    def box(self) -> tuple[slice, slice, slice]:
        """Where the mask lies in the series."""
        if self.offset is None:
            return (slice(None),) * 3  # type: ignore[return-value]
        return tuple(slice(int(o), int(o) + n) for o, n in zip(self.offset, np.shape(self.mask)))  # type: ignore[return-value]


@dataclass(frozen=True)
class Segmentation:
    """Label masks aligned to one source series."""

    source_series_uid: str
    segments: Sequence[Segment]


@dataclass(frozen=True)
class PluginResult:
    findings: Sequence[Finding] = ()
    segmentations: Sequence[Segmentation] = ()
    heatmap: np.ndarray | None = None  # float 0..1, same shape as the source series
    summary: str = ""
    timings: Mapping[str, float] = field(default_factory=dict)  # e.g. preprocess_s, inference_s, postprocess_s
    gpu_memory_peak_mb: float | None = None


@dataclass(frozen=True)
class Accepts:
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()  # empty: any
    min_slices: int = 1


@dataclass(frozen=True)
class Resources:
    gpu: bool = False  # uses a GPU when one is there (the same code runs on CPU)
    memory_mb: int = 1024  # host memory estimate
    gpu_memory_mb: int = 0  # GPU memory estimate: a job waits until its slot's GPU has this much free


class Plugin(abc.ABC):
    """Base class for analysis plugins, registered under the `ainode.plugins` entry point."""

    name: str = ""
    version: str = ""
    accepts: Accepts = Accepts()
    resources: Resources = Resources()
    model_name: str | None = None  # the model package it needs (models/<model_name>/<version>/), if any
    model_version: str | None = None  # the version it was validated with; config plugins.<name>.model_version pins another

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.options = dict(options or {})
        self.model: Any = None  # node.models.LoadedModel, set by load_model before the first run
        self.device: str = "cpu"  # "cuda:N" when the node gives the plugin's worker a GPU

    def load_model(self, model: Any) -> None:
        """Called once, after the node verified the package's hashes. Load weights here (on self.device)."""
        self.model = model

    def prepare(self, study: StudyInput) -> Any:
        """Optional pre-processing on the host (cropping, resampling, windowing), passed to `run` as
        `study.prepared`. The node calls it for the next queued study while the current one runs, so the
        GPU does not wait for it. It runs in another thread: read only the study and the model here, and
        allocate no GPU memory (that is reserved for the running job)."""
        return None

    @abc.abstractmethod
    def run(self, study: StudyInput) -> PluginResult:
        """Analyse the study. Raise to fail the job; the node records the error."""


class PluginNotFound(LookupError):
    pass


def available_plugins() -> dict[str, Any]:
    """Entry points of installed plugins, by name (not loaded)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def plugin_class(name: str, entry: str | None = None) -> type[Plugin]:
    """The installed plugin class `name`, or the class `entry` ('package.module:Class') when one is given."""
    if entry:
        module, _, attr = entry.partition(":")
        return getattr(importlib.import_module(module), attr)
    eps = available_plugins()
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none"
        raise PluginNotFound(
            f"plugin '{name}' is not installed (entry point group '{ENTRY_POINT_GROUP}'); installed: {known}"
        )
    return eps[name].load()


def load_plugin(name: str, options: Mapping[str, Any] | None = None, entry: str | None = None) -> Plugin:
    cls = plugin_class(name, entry)
    plugin = cls(options)
    if not plugin.name or not plugin.version:
        raise PluginNotFound(f"plugin '{name}' ({cls!r}) does not declare name and version")
    return plugin
