"""Classical lung segmentation on a CT volume in HU; vectorised numpy/scipy, no loops over voxels.

threshold air-like voxels → (component analysis on an in-plane max-pooled grid, for speed)
→ drop the air outside the body (components touching the in-plane border)
→ remove the trachea and main bronchi (very low HU, reaching the most superior slices)
→ keep the two largest components (split at the gap between the lungs if they touch)
→ back to full resolution: the lung is every air-like voxel of a kept coarse voxel
→ fill holes slice by slice so vessels and nodules inside the lung count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LUNG_MAX_HU = -400.0  # lung parenchyma is well below this, soft tissue well above
AIRWAY_MAX_HU = -950.0  # air in the trachea and bronchi; parenchyma is rarely this low
MIN_LUNG_FRACTION = 0.05  # the smaller lung must hold at least this share of the two
AIRWAY_MAX_FRACTION = 0.1  # an "airway" component bigger than this share of all candidates is lung


@dataclass(frozen=True)
class LungMasks:
    left: np.ndarray
    right: np.ndarray


class NoLungsFound(ValueError):
    pass


def _pool(mask: np.ndarray, f: int) -> np.ndarray:
    """In-plane max-pool by f (pads odd sizes): a coarse voxel is set if any of its fine voxels is."""
    if f == 1:
        return mask
    z, r, c = mask.shape
    pr, pc = -r % f, -c % f
    if pr or pc:
        mask = np.pad(mask, ((0, 0), (0, pr), (0, pc)))
    out = mask[:, ::f, ::f].copy()
    for i in range(f):  # f*f strided views, not a loop over voxels
        for j in range(f):
            if i or j:
                out |= mask[:, i::f, j::f]
    return out


def _bbox(mask: np.ndarray) -> tuple[slice, slice, slice]:
    zs, ys, xs = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    return slice(zs[0], zs[-1] + 1), slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1)


def _to_fine(candidate: np.ndarray, coarse: np.ndarray, f: int) -> np.ndarray:
    """Every fine candidate voxel whose coarse voxel is set, worked on the bounding box only."""
    out = np.zeros_like(candidate)
    if not coarse.any():
        return out
    bz, by, bx = _bbox(coarse)
    fy = slice(by.start * f, min(by.stop * f, candidate.shape[1]))
    fx = slice(bx.start * f, min(bx.stop * f, candidate.shape[2]))
    up = coarse[bz, by, bx]
    if f > 1:
        up = np.repeat(np.repeat(up, f, axis=1), f, axis=2)[:, :fy.stop - fy.start, :fx.stop - fx.start]
    out[bz, fy, fx] = candidate[bz, fy, fx] & up
    return out


def _border_touching(labels: np.ndarray, n: int) -> np.ndarray:
    """Boolean index over label ids 0..n: True where the component touches the in-plane border."""
    border = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[np.unique(edge)] = True
    border[0] = True
    return border


def _remove_airways(candidate: np.ndarray, air: np.ndarray, superior_last: bool) -> np.ndarray:
    """Airway = the very-low-HU components that reach the most superior slices holding candidate voxels."""
    z_any = np.flatnonzero(candidate.any(axis=(1, 2)))
    if z_any.size == 0:
        return candidate
    air = air & candidate
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
    is_airway &= sizes < AIRWAY_MAX_FRACTION * np.count_nonzero(candidate)
    return candidate & ~is_airway[labels]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed holes slice by slice (vessels, nodules), on the bounding box only."""
    if not mask.any():
        return mask
    box = _bbox(mask)
    out = np.zeros_like(mask)
    # A 2-D structure per slice: axial holes closed in-plane, as a reader outlines a lung.
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    out[box] = ndimage.binary_fill_holes(mask[box], structure=structure)
    return out


def _split_joined(mask: np.ndarray, patient_x_coarse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split one component holding both lungs at the thinnest point between them along patient x."""
    order = np.argsort(patient_x_coarse, kind="stable")  # columns from patient right to left
    profile = mask.sum(axis=(0, 1))[order]
    cum = np.cumsum(profile)
    total = cum[-1]
    # The gap between the lungs lies in the middle of the mass, not in a lung's thin lateral edge.
    lo, hi = np.searchsorted(cum, 0.2 * total), np.searchsorted(cum, 0.8 * total)
    if hi <= lo:
        cut = lo
    else:
        cut = lo + int(np.argmin(profile[lo:hi + 1]))
    # Two lungs narrow to a thin junction between them; one air region (a single lung, a gas-filled
    # bowel) has no such waist and is not split into a pair.
    if profile[cut] > 0.5 * min(profile[:cut + 1].max(), profile[cut:].max()):
        raise NoLungsFound("found one air-filled region only, not two lungs")
    on_left = np.zeros(mask.shape[2], dtype=bool)
    on_left[order[cut + 1:]] = True
    return mask & ~on_left[None, None, :], mask & on_left[None, None, :]


def segment_lungs(hu: np.ndarray, patient_x: np.ndarray, superior_last: bool, *, pool: int = 1,
                  min_lung_voxels: int = 1) -> LungMasks:
    """Left and right lung masks, full resolution.

    `patient_x[j]` is the patient x (LPS; + is left) of column j at the volume's centre and
    `superior_last` says whether the last slice is the most superior one, so left/right and the
    trachea come from the geometry, not from assumptions about the image layout. `pool` is the
    in-plane factor of the grid the component analysis runs on; the masks keep every fine voxel.
    """
    candidate = hu < LUNG_MAX_HU
    coarse = _pool(candidate, pool)
    labels, n = ndimage.label(coarse)
    if n == 0:
        raise NoLungsFound("no air-like voxels in the volume")
    coarse &= ~_border_touching(labels, n)[labels]
    del labels
    coarse = _remove_airways(coarse, _pool(hu < AIRWAY_MAX_HU, pool), superior_last)

    labels, n = ndimage.label(coarse)
    if n == 0:
        raise NoLungsFound("no air-filled region inside the body")
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    px_coarse = patient_x[::pool] if pool > 1 else patient_x
    first = labels == order[0]
    if n > 1 and sizes[order[1]] >= MIN_LUNG_FRACTION * sizes[order[0]]:
        second = labels == order[1]
    else:
        # The lungs touch (or one is missing): split the component between them.
        first, second = _split_joined(first, px_coarse)
    del labels

    na, nb = int(np.count_nonzero(first)) * pool * pool, int(np.count_nonzero(second)) * pool * pool
    if min(na, nb) < max(min_lung_voxels, MIN_LUNG_FRACTION * max(na, nb)):
        raise NoLungsFound(f"found no pair of lungs (air-filled regions of about {na} and {nb} voxels)")

    def mean_x(mask: np.ndarray) -> float:
        per_col = np.count_nonzero(mask, axis=(0, 1))
        return float((px_coarse * per_col).sum() / max(per_col.sum(), 1))

    if mean_x(first) < mean_x(second):
        first, second = second, first
    return LungMasks(left=_fill_holes(_to_fine(candidate, first, pool)),
                     right=_fill_holes(_to_fine(candidate, second, pool)))
