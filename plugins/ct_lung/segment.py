"""Classical lung segmentation on a CT volume in HU; vectorised numpy/scipy.

threshold air-like voxels → drop the air outside the body (components touching the in-plane border)
→ remove the trachea and main bronchi (very low HU, connected to the top of the airway tree)
→ keep the two largest components (split at the body midline if the lungs touch)
→ fill holes so vessels and nodules inside the lung count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LUNG_MAX_HU = -400.0  # lung parenchyma is well below this, soft tissue well above
AIRWAY_MAX_HU = -950.0  # air in the trachea and bronchi; parenchyma is rarely this low
MIN_LUNG_FRACTION = 0.05  # the smaller lung must hold at least this share of the two


@dataclass(frozen=True)
class LungMasks:
    left: np.ndarray
    right: np.ndarray


class NoLungsFound(ValueError):
    pass


def _border_touching(labels: np.ndarray, n: int) -> np.ndarray:
    """Boolean index over label ids 0..n: True where the component touches the in-plane border."""
    border = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[np.unique(edge)] = True
    border[0] = True
    return border


def _remove_airways(candidate: np.ndarray, hu: np.ndarray, superior_last: bool) -> np.ndarray:
    """Airway = the very-low-HU components that reach the most superior slices holding candidate voxels."""
    z_any = np.flatnonzero(candidate.any(axis=(1, 2)))
    if z_any.size == 0:
        return candidate
    air = candidate & (hu < AIRWAY_MAX_HU)
    labels, n = ndimage.label(air)
    if n == 0:
        return candidate
    depth = max(1, int(0.05 * (z_any[-1] - z_any[0] + 1)))
    top = slice(z_any[-1] - depth + 1, z_any[-1] + 1) if superior_last else slice(z_any[0], z_any[0] + depth)
    airway_ids = np.unique(labels[top])
    airway_ids = airway_ids[airway_ids > 0]
    if airway_ids.size == 0:
        return candidate
    is_airway = np.zeros(n + 1, dtype=bool)
    is_airway[airway_ids] = True
    # The airway tree is thin: a component this size or bigger is a lung, not a trachea.
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    is_airway &= sizes < 0.1 * candidate.sum()
    return candidate & ~is_airway[labels]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes slice by slice (vessels, nodules), on the bounding box only."""
    if not mask.any():
        return mask
    zs, ys, xs = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    box = (slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
    out = np.zeros_like(mask)
    # A 2-D structure per slice: axial holes closed in-plane, as a reader outlines a lung.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    out[box] = ndimage.binary_fill_holes(mask[box], structure=structure)
    return out


def segment_lungs(hu: np.ndarray, patient_x: np.ndarray, superior_last: bool) -> LungMasks:
    """Left and right lung masks.

    `patient_x[j]` is the patient x (LPS; + is left) of column j at the volume's centre and
    `superior_last` says whether the last slice is the most superior one, so left/right and the
    trachea come from the geometry, not from assumptions about the image layout.
    """
    candidate = hu < LUNG_MAX_HU
    labels, n = ndimage.label(candidate)
    if n == 0:
        raise NoLungsFound("no air-like voxels inside the body")
    candidate &= ~_border_touching(labels, n)[labels]
    del labels
    candidate = _remove_airways(candidate, hu, superior_last)

    labels, n = ndimage.label(candidate)
    if n == 0:
        raise NoLungsFound("no air-filled region inside the body")
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    first = labels == order[0]
    second = labels == order[1] if n > 1 and sizes[order[1]] >= MIN_LUNG_FRACTION * sizes[order[0]] else None
    if second is None:
        # The lungs touch (or one is missing): split the component at the body's midline.
        midline = 0.0
        on_left = (patient_x > midline)[None, None, :]
        first, second = first & on_left, first & ~on_left
        if min(first.sum(), second.sum()) < MIN_LUNG_FRACTION * max(first.sum(), second.sum(), 1):
            raise NoLungsFound("found one air-filled region only, not two lungs")
    def mean_x(mask: np.ndarray) -> float:
        per_col = mask.sum(axis=(0, 1))
        return float((patient_x * per_col).sum() / max(per_col.sum(), 1)) if per_col.any() else 0.0

    a, b = _fill_holes(first), _fill_holes(second)
    if mean_x(a) > mean_x(b):
        return LungMasks(left=a, right=b)
    return LungMasks(left=b, right=a)
