"""Reads a spooled series into one physical-unit volume for a plugin."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.plugin_api import SeriesVolume


class SeriesLoadError(ValueError):
    pass


def _normal(iop: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    return np.cross(row, col)


def load_series(paths: Sequence[Path | str]) -> tuple[SeriesVolume, list[Dataset]]:
    """Volume (slices sorted along the plane normal) and the headers in the same order.

    The returned datasets have no pixel data, to keep memory to one copy of the volume.
    """
    if not paths:
        raise SeriesLoadError("series has no instances")
    datasets = [dcmread(p) for p in paths]
    first = datasets[0]
    series_uid = str(first.SeriesInstanceUID)
    for ds, p in zip(datasets, paths):
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if kw not in ds:
                raise SeriesLoadError(f"{p}: {kw} is missing; series {series_uid} cannot be read as a volume")
    iop = [float(v) for v in first.ImageOrientationPatient]
    normal = _normal(iop)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    order = np.argsort(positions @ normal, kind="stable")
    datasets = [datasets[i] for i in order]
    positions = positions[order]
    rows, cols = int(first.Rows), int(first.Columns)
    vol = np.empty((len(datasets), rows, cols), dtype=np.float32)
    for k, ds in enumerate(datasets):
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise SeriesLoadError(
                f"instance {ds.SOPInstanceUID}: {ds.Rows}x{ds.Columns} differs from {rows}x{cols} in series {series_uid}"
            )
        arr = ds.pixel_array
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        np.multiply(arr, slope, out=vol[k], casting="unsafe")
        vol[k] += intercept
        del ds.PixelData
    if len(datasets) > 1:
        gaps = np.diff(positions @ normal)
        slice_spacing = float(np.median(gaps))
        if slice_spacing <= 0:
            raise SeriesLoadError(f"series {series_uid}: duplicate slice positions")
    else:
        slice_spacing = float(first.get("SliceThickness", 1.0) or 1.0)
    ps = [float(v) for v in first.PixelSpacing]
    volume = SeriesVolume(
        series_uid=series_uid,
        modality=str(first.get("Modality", "")),
        pixels=vol,
        spacing=(slice_spacing, ps[0], ps[1]),
        origin=tuple(float(v) for v in positions[0]),  # type: ignore[arg-type]
        orientation=tuple(iop),  # type: ignore[arg-type]
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in datasets),
        headers=tuple(datasets),
    )
    return volume, datasets
