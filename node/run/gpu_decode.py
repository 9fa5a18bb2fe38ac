"""JPEG 2000, HTJ2K and JPEG slices decoded on the job's GPU (run.gpu_decode), through nvImageCodec's pydicom
plugin.

Decoding a 512x512 JPEG 2000 slice costs 17 ms of CPU here (bench/gpu_decode.py), so a 300-slice series
pushed all at once spends seconds in decoding before a GPU plugin starts. NVIDIA ships a pydicom decoder
plugin with nvImageCodec (nvidia.nvimgcodec.tools.dicom.pydicom_plugin, the one MONAI Deploy uses): it
decodes the frame on the GPU and leaves the stored values to pydicom's own decode runner (bit depth, sign,
colour), so a slice comes out as pydicom's `pixel_array` would with its CPU decoders. It is registered here
under our own label and asked for by name, per data set, only in a worker process whose plugin runs on CUDA:
such a process already holds a CUDA context, where the node's decode processes (forked, one per CPU) would
each start one of their own. Its decoder is one per process and not documented as thread-safe, so calls
are made one at a time (the job's conversion threads, read-ahead and prefetch all decode). A slice the GPU
cannot decode is decoded by pydicom's CPU plugins instead, and said once in the log.
"""

from __future__ import annotations

import importlib
import logging
import threading
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.decoders import (HTJ2KDecoder, HTJ2KLosslessDecoder, HTJ2KLosslessRPCLDecoder, JPEG2000Decoder,
                                     JPEG2000LosslessDecoder, JPEGBaseline8BitDecoder, JPEGLosslessDecoder,
                                     JPEGLosslessSV1Decoder)
from pydicom.uid import UID

log = logging.getLogger("ainode.run")

PLUGIN = "ainode-nvimgcodec"  # our label in pydicom's decoders
NVIMGCODEC_PLUGIN = "nvidia.nvimgcodec.tools.dicom.pydicom_plugin"
_DECODERS = (JPEG2000LosslessDecoder, JPEG2000Decoder, HTJ2KLosslessDecoder, HTJ2KLosslessRPCLDecoder, HTJ2KDecoder,
             JPEGBaseline8BitDecoder, JPEGLosslessDecoder, JPEGLosslessSV1Decoder)
SYNTAXES = frozenset(str(d.UID) for d in _DECODERS)
DECODER_DEPENDENCIES = {d.UID: ("numpy", "nvidia-nvimgcodec-cu12 or -cu13 with its jpeg and jpeg2k extras")
                        for d in _DECODERS}  # pydicom's plugin interface asks for it

_lock = threading.Lock()
_plugin: Any = None  # nvImageCodec's pydicom plugin module, once enable() has succeeded in this process
_failed_once = False


def is_available(uid: UID) -> bool:
    """pydicom's plugin interface: whether this plugin decodes `uid` (only once enable() has succeeded)."""
    return _plugin is not None and str(uid) in SYNTAXES


def _decode_frame(src: bytes, runner: Any) -> bytes | bytearray:
    """pydicom's plugin interface: one frame, decoded by nvImageCodec's plugin, one call at a time."""
    with _lock:
        return _plugin._decode_frame(src, runner)


def _import() -> tuple[Any, str | None]:
    """(nvImageCodec's pydicom plugin module, None), or (None, why not); loads its library, starts no GPU."""
    try:
        return importlib.import_module(NVIMGCODEC_PLUGIN), None
    except ImportError as exc:
        return None, (f"nvImageCodec's pydicom plugin does not import ({exc}); pip install "
                      "'nvidia-nvimgcodec-cu12[all]' (cu13 for CUDA 13) in the node's environment, or set "
                      "run.gpu_decode: false")


def installed() -> str | None:
    """None if nvImageCodec's pydicom plugin is there (for `ainode check-config`; only a worker on a GPU can
    tell whether its decoder starts), else why not."""
    return _import()[1]


def enable(device: str) -> str | None:
    """Decode GPU-decodable slices on the GPU in this process from now on; None if so, else why not."""
    global _plugin
    if not device.startswith("cuda"):
        return f"the plugin runs on {device}"
    if _plugin is not None:
        return None
    plugin, why = _import()
    if why:
        return why
    try:
        with _lock:
            plugin._get_decoder_resources()  # makes the decoder now, so a missing library is said at start
    except Exception as exc:  # noqa: BLE001 - a missing CUDA library or driver: the CPU decoders stay
        return f"nvImageCodec's decoder cannot start on {device}: {type(exc).__name__}: {exc}"
    _plugin = plugin
    for decoder in _DECODERS:
        if PLUGIN not in decoder.available_plugins:
            decoder.add_plugin(PLUGIN, (__name__, "_decode_frame"))
    return None


def disable() -> None:
    """Back to pydicom's CPU decoders in this process (tests)."""
    global _plugin, _failed_once
    _plugin = None
    _failed_once = False
    for decoder in _DECODERS:
        if PLUGIN in decoder.available_plugins:
            decoder.remove_plugin(PLUGIN)


def active() -> bool:
    """Whether this process decodes on the GPU (enable() succeeded)."""
    return _plugin is not None


def takes(ds: Dataset) -> bool:
    """Whether this data set's pixel data is decoded on the GPU in this process."""
    meta = getattr(ds, "file_meta", None)
    return _plugin is not None and meta is not None and str(meta.get("TransferSyntaxUID", "")) in SYNTAXES


def pixel_array(ds: Dataset) -> np.ndarray:
    """The data set's stored values, decoded on the GPU; by pydicom's CPU plugins if the GPU cannot."""
    global _failed_once
    ds.pixel_array_options(decoding_plugin=PLUGIN)
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - whatever the GPU decoder refuses, the CPU decoders may take
        if not _failed_once:
            _failed_once = True
            log.warning("GPU decode failed, decoding on the CPU instead (said once) transfer_syntax=%s error=%s",
                        ds.file_meta.get("TransferSyntaxUID", ""), f"{type(exc).__name__}: {exc}")
    finally:
        ds.pixel_array_options(decoding_plugin="")
    return ds.pixel_array
