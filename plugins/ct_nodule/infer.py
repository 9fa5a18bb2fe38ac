"""Pre-processing and sliding-window inference, one code path for CPU and CUDA.

Only two things depend on the device: where the tensors live, and the autocast setting (`Amp`): float16 or
bfloat16 mixed precision on CUDA, float32 on CPU (the autocast context is entered there too, disabled).
The training script uses `prepare` and `to_model_grid` as well, so the network is trained on exactly the
input the plugin gives it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

BODY_MIN_HU = -500.0  # the body (and the table) is above this; the air around it is below
BODY_MARGIN_MM = 6.0
# Model voxels of mirrored image added where the scan cuts through the body (always at the first and last
# slice, in-plane where the body reaches the image edge). Without them the model marked "nodules" along
# the cut: 6-9 false positives on 24-slice cuts of a synthetic chest, none with the mirror.
EDGE_PAD = 12

T = TypeVar("T")


@dataclass(frozen=True)
class Amp:
    """The autocast setting of a device: the only difference between the CPU and the CUDA run."""

    device_type: str
    dtype: torch.dtype
    enabled: bool


def amp_for(device: str | torch.device) -> Amp:
    dev = torch.device(device)
    if dev.type == "cuda":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return Amp("cuda", torch.bfloat16 if bf16 else torch.float16, True)
    return Amp(dev.type, torch.bfloat16, False)  # CPU: float32 (bf16 convolutions are slow on most CPUs)


@dataclass(frozen=True)
class Prepared:
    """The network's input and how it maps back to the source series."""

    image: torch.Tensor  # (z, y, x) float32 0..1 on the device, at ~model spacing
    box: tuple[slice, slice, slice]  # the crop of the source volume (around the body) that `image` covers
    crop_shape: tuple[int, int, int]
    model_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    edge_pad: tuple[tuple[int, int], ...] = ((0, 0), (0, 0), (0, 0))  # mirrored voxels per axis (before, after)

    @property
    def model_spacing(self) -> tuple[float, float, float]:
        """The exact spacing of the model grid (the crop's extent over the model voxel count)."""
        return tuple(c * s / m for c, s, m in zip(self.crop_shape, self.source_spacing, self.model_shape))


def body_box(hu: torch.Tensor, spacing: Sequence[float]) -> tuple[slice, slice, slice]:
    """Bounding box of the voxels above BODY_MIN_HU plus a margin; the whole volume if there are none.

    From the volume's maxima over slices and over each slice's plane (a voxel above the threshold is a
    maximum above it): two passes over the volume and no mask the volume's size, where a mask and a
    reduction of it per axis took 0.16 s for a 300-slice CT on the 2-core VM (now 0.03 s)."""
    plane = hu.amax(dim=0) > BODY_MIN_HU  # (y, x): above the threshold on some slice
    profiles = (hu.flatten(1).amax(dim=1) > BODY_MIN_HU, plane.any(dim=1), plane.any(dim=0))
    box = []
    for axis, profile in enumerate(profiles):
        idx = torch.nonzero(profile).flatten()
        n = hu.shape[axis]
        if idx.numel() == 0:
            return (slice(0, hu.shape[0]), slice(0, hu.shape[1]), slice(0, hu.shape[2]))
        m = int(math.ceil(BODY_MARGIN_MM / spacing[axis]))
        box.append(slice(max(0, int(idx[0]) - m), min(n, int(idx[-1]) + 1 + m)))
    return tuple(box)  # type: ignore[return-value]


def model_shape_for(shape: Sequence[int], spacing: Sequence[float],
                    model_spacing: Sequence[float]) -> tuple[int, int, int]:
    out = tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, model_spacing))
    return out  # type: ignore[return-value]


def to_model_grid(volume: torch.Tensor, model_shape: Sequence[int]) -> torch.Tensor:
    """Trilinear resampling of a (z, y, x) tensor whose extent maps onto the model grid's extent."""
    if tuple(volume.shape) == tuple(model_shape):
        return volume
    return F.interpolate(volume[None, None], size=tuple(model_shape), mode="trilinear", align_corners=False)[0, 0]


def prepare(pixels: np.ndarray, spacing: Sequence[float], model_spacing: Sequence[float],
            hu_window: Sequence[float], device: str | torch.device) -> Prepared:
    """Source HU volume → body crop → HU window to 0..1 → model spacing, on `device`."""
    hu = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(device)
    box = body_box(hu, spacing)
    lo, hi = float(hu_window[0]), float(hu_window[1])
    crop = hu[box].clamp(lo, hi)  # a new tensor, changed in place: two fewer of its size (0.19 -> 0.09 s)
    crop.sub_(lo).div_(hi - lo)
    shape = model_shape_for(crop.shape, spacing, model_spacing)
    image = to_model_grid(crop, shape).contiguous()
    pad = [(EDGE_PAD, EDGE_PAD)]  # a scan always ends inside the body
    for axis in (1, 2):  # in-plane only where the body reaches the image edge
        pad.append((EDGE_PAD if box[axis].start == 0 else 0, EDGE_PAD if box[axis].stop == hu.shape[axis] else 0))
    return Prepared(image, box, tuple(crop.shape), shape, tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                    tuple(pad))


def _starts(n: int, patch: int, overlap: int) -> list[int]:
    """Window starts along one axis: step patch-overlap, the last window flush with the end."""
    if n <= patch:
        return [0]
    step = max(1, patch - overlap)
    starts = list(range(0, n - patch, step))
    starts.append(n - patch)
    return starts


def _ramp(n: int, width: int, device: torch.device) -> torch.Tensor:
    """1 in the middle, falling linearly towards both ends over `width` voxels: seams blend smoothly."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    r = torch.minimum(i + 1, n - i) / float(max(width, 1))
    return r.clamp(max=1.0)


def predict_volume(net: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, patch: Sequence[int],
                   batch_size: int, amp: Amp, overlap: Sequence[int] | None = None,
                   edge_pad: Sequence[tuple[int, int]] = ((0, 0), (0, 0), (0, 0))) -> torch.Tensor:
    """Nodule probability (z, y, x) float32 for `image`, by batched sliding windows of `patch` voxels.

    The one inference function, for CPU and CUDA alike: `amp` is the only device-specific input. Windows
    overlap by `overlap` voxels per axis (default a quarter of the patch) and are blended with linear
    ramps; `edge_pad` voxels of mirrored image are added per axis (before, after) and cut off again; a
    volume still smaller than a patch is padded with 0 (air after windowing).
    """
    patch = tuple(int(p) for p in patch)
    overlap = tuple(int(o) for o in (overlap or [p // 8 for p in patch]))
    cut = [(min(int(a), n - 1), min(int(b), n - 1)) for (a, b), n in zip(edge_pad, image.shape)]
    if any(a or b for a, b in cut):
        image = F.pad(image[None, None], (*cut[2], *cut[1], *cut[0]), mode="reflect")[0, 0]
    shape = tuple(image.shape)
    padded = tuple(max(n, p) for n, p in zip(shape, patch))
    if padded != shape:
        image = F.pad(image, (0, padded[2] - shape[2], 0, padded[1] - shape[1], 0, padded[0] - shape[0]))
    dev = image.device
    weight = (_ramp(patch[0], overlap[0], dev)[:, None, None] * _ramp(patch[1], overlap[1], dev)[None, :, None]
              * _ramp(patch[2], overlap[2], dev)[None, None, :])
    acc = torch.zeros(padded, device=dev, dtype=torch.float32)
    wsum = torch.zeros(padded, device=dev, dtype=torch.float32)
    corners = [(z, y, x) for z in _starts(padded[0], patch[0], overlap[0])
               for y in _starts(padded[1], patch[1], overlap[1]) for x in _starts(padded[2], patch[2], overlap[2])]
    with torch.inference_mode(), torch.autocast(amp.device_type, dtype=amp.dtype, enabled=amp.enabled):
        for b in range(0, len(corners), batch_size):
            chunk = corners[b:b + batch_size]
            batch = torch.stack([image[z:z + patch[0], y:y + patch[1], x:x + patch[2]] for z, y, x in chunk])
            prob = torch.sigmoid(net(batch[:, None]).float())[:, 0]
            for (z, y, x), p in zip(chunk, prob):
                acc[z:z + patch[0], y:y + patch[1], x:x + patch[2]] += p * weight
                wsum[z:z + patch[0], y:y + patch[1], x:x + patch[2]] += weight
    prob = acc / wsum.clamp(min=1e-6)
    return prob[tuple(slice(a, n - b) for (a, b), n in zip(cut, shape))].contiguous()


def with_oom_backoff(run: Callable[[int], T], batch_size: int,
                     on_retry: Callable[[int, BaseException], None] | None = None) -> tuple[T, int]:
    """`run(batch_size)`; on CUDA out-of-memory halve the batch and run the whole study again, down to 1.

    Returns (result, the batch size that worked). An out-of-memory error at batch size 1 is raised.
    """
    batch = max(1, int(batch_size))
    while True:
        try:
            return run(batch), batch
        except torch.cuda.OutOfMemoryError as exc:
            if batch == 1:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch //= 2
            if on_retry is not None:
                on_retry(batch, exc)


def sample_at(prob: torch.Tensor, model_shape: Sequence[int], crop_shape: Sequence[int],
              ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The model-grid `prob` trilinearly interpolated at the source-crop voxels in `ranges` ((start, stop)
    per axis), consistent with `to_model_grid`'s mapping (align_corners=False: the extents coincide)."""
    dev = prob.device
    axes = [((2 * torch.arange(a, b, device=dev, dtype=torch.float32) + 1) / n - 1)
            for (a, b), n in zip(ranges, crop_shape)]
    gz, gy, gx = torch.meshgrid(*axes, indexing="ij")
    grid = torch.stack([gx, gy, gz], dim=-1)[None]  # grid_sample wants (x, y, z)
    out = F.grid_sample(prob[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, 0]
