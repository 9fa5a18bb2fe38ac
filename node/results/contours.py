"""Outlines of binary masks, for drawing a segmentation where a viewer cannot show SEG.

Two forms: closed polylines along the pixel borders (for GSPS graphics, in DICOM PIXEL units, where
the top-left corner of the top-left pixel is (0, 0) and pixel corners lie on integer coordinates), and
the mask's own edge pixels (for burning into a key image).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Edge directions on the image, y pointing down: a right turn is +1 (mod 4).
_E, _S, _W, _N = 0, 1, 2, 3


def mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2-D mask as (N, 2) float arrays of (column, row) pixel corners.

    One outline per 4-connected region and one per hole in it, each closed (last point = first) and
    with collinear points removed. Outer outlines run clockwise on screen, holes anticlockwise.
    Outlines follow the pixel borders exactly, so the polygon encloses exactly the mask's pixels;
    where two regions touch only at a corner, they get separate outlines. Order is deterministic:
    by the outline's top-left corner, top to bottom, then left to right.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask_contours needs a 2-D (rows, columns) mask, got shape {mask.shape}")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    r0, c0 = int(rows[0]), int(cols[0])  # trace within the bounding box only; shifted back at the end
    m = np.pad(mask[r0:rows[-1] + 1, c0:cols[-1] + 1], 1)
    h, w = m.shape
    stride = w + 1  # vertices are the (h + 1) x (w + 1) pixel corners of the padded mask
    xs, ys, ds = [], [], []
    # Each border edge is directed so that the mask lies on its right.
    r, c = np.nonzero(m[1:, :] & ~m[:-1, :])  # top edges of pixels (r + 1, c): (c, r+1) -> (c+1, r+1)
    xs.append(c), ys.append(r + 1), ds.append(np.full(r.size, _E))
    r, c = np.nonzero(m[:-1, :] & ~m[1:, :])  # bottom edges of pixels (r, c): (c+1, r+1) -> (c, r+1)
    xs.append(c + 1), ys.append(r + 1), ds.append(np.full(r.size, _W))
    r, c = np.nonzero(m[:, 1:] & ~m[:, :-1])  # left edges of pixels (r, c + 1): (c+1, r+1) -> (c+1, r)
    xs.append(c + 1), ys.append(r + 1), ds.append(np.full(r.size, _N))
    r, c = np.nonzero(m[:, :-1] & ~m[:, 1:])  # right edges of pixels (r, c): (c+1, r) -> (c+1, r+1)
    xs.append(c + 1), ys.append(r), ds.append(np.full(r.size, _S))
    x0, y0, d = np.concatenate(xs), np.concatenate(ys), np.concatenate(ds)
    if x0.size == 0:
        return []
    dx = np.where(d == _E, 1, np.where(d == _W, -1, 0))
    dy = np.where(d == _S, 1, np.where(d == _N, -1, 0))
    start = y0 * stride + x0
    end = (y0 + dy) * stride + (x0 + dx)
    # Sort edges by (start vertex, direction) so each is found by key; the sort also fixes the tracing order.
    order = np.lexsort((d, start))
    x0, y0, d, start, end = x0[order], y0[order], d[order], start[order], end[order]
    keys = start * 4 + d
    # The edge that follows each edge: the only one leaving its end vertex, except at a saddle (two
    # regions meeting at a corner), where turning right keeps the outline around one region.
    nxt = np.full(keys.size, -1)
    for turn in (3, 0, 1):  # left, straight, right: the last found wins, so right is preferred
        want = end * 4 + (d + turn) % 4
        pos = np.minimum(np.searchsorted(keys, want), keys.size - 1)
        hit = keys[pos] == want
        nxt[hit] = pos[hit]
    if (nxt < 0).any():
        raise AssertionError("open mask outline: an edge has no successor")  # cannot happen for a pixel mask
    seen = np.zeros(keys.size, dtype=bool)
    nxt_l = nxt.tolist()
    out = []
    for first in range(keys.size):
        if seen[first]:
            continue
        loop = [first]
        seen[first] = True
        e = nxt_l[first]
        while e != first:
            loop.append(e)
            seen[e] = True
            e = nxt_l[e]
        idx = np.asarray(loop)
        dirs = d[idx]
        turns = dirs != np.roll(dirs, 1)  # keep the corners only
        pts = np.stack([x0[idx][turns] + (c0 - 1), y0[idx][turns] + (r0 - 1)], axis=1).astype(float)
        out.append(np.vstack([pts, pts[:1]]))
    return out


def edge_pixels(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """The mask's pixels within `width` pixels of its border (the image border counts as outside)."""
    m = np.asarray(mask, dtype=bool)
    if width < 1:
        raise ValueError(f"outline width must be at least 1 pixel, got {width}")
    return m & ~ndimage.binary_erosion(m, iterations=width, border_value=0)


def simplify(closed: np.ndarray, tolerance: float) -> np.ndarray:
    """A closed outline with fewer points (Douglas-Peucker): no point of it moves more than `tolerance`.

    A pixel-border outline is a staircase with a corner at every step; at half a pixel the outline looks
    the same and a curved organ needs several times fewer points (smaller objects, faster to build).
    The points kept are a subset of the input's; an outline that would collapse is returned unchanged.
    """
    ring = np.asarray(closed, dtype=float)
    n = len(ring) - 1
    if n <= 4 or tolerance <= 0:
        return ring
    far = int(np.argmax(((ring[:n] - ring[0]) ** 2).sum(axis=1)))
    keep = np.zeros(n + 1, dtype=bool)
    keep[[0, far, n]] = True
    stack = [(0, far), (far, n)]
    while stack:
        i, j = stack.pop()
        if j - i < 2:
            continue
        a, ab, rest = ring[i], ring[j] - ring[i], ring[i + 1:j]
        length = float(np.hypot(*ab))
        rel = rest - a
        dist = (np.abs(ab[0] * rel[:, 1] - ab[1] * rel[:, 0]) / length if length > 0
                else np.hypot(rel[:, 0], rel[:, 1]))
        k = int(np.argmax(dist))
        if dist[k] > tolerance:
            m = i + 1 + k
            keep[m] = True
            stack += [(i, m), (m, j)]
    out = ring[keep]
    return out if len(out) >= 4 else ring  # at least a triangle (3 points and the closing one)
