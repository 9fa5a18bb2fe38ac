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

One call per slice costs 12 ms on an H100 (nvImageCodec's per-call setup and sync), 3x the node's 16 CPU
decode processes there; one call for a batch of slices costs 1.5 ms a slice (bench/gpu_decode.py). So a
series' slices are decoded in batches first (`batch`), and the plugin's per-frame call then takes each
slice's decoded frame from that batch through the decoder it asks for, which keeps pydicom's handling of
the result (bit depth, sign, colour) exactly as it is for a single frame.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import sys
import tempfile
import threading
from typing import Any, Iterator, Literal, Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
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

Setting = Literal["auto"] | bool  # run.gpu_decode: "auto" uses it where nvImageCodec and a GPU plugin are there
BATCH_FRAMES = 128  # frames per batched call: 64 MB of 512x512 int16 on the GPU at once, whatever the series

_lock = threading.Lock()
_stderr_lock = threading.Lock()  # one redirection of stderr at a time (_library_output_logged)
_plugin: Any = None  # nvImageCodec's pydicom plugin module, once enable() has succeeded in this process
_batched: "_BatchedDecoder | None" = None  # the decoder the plugin asks for, where batches are possible
_failed_once = False


class _HostFrame:
    """A frame decoded in a batch, already in host memory: what the plugin calls `.cpu()` on."""

    def __init__(self, array: np.ndarray) -> None:
        self._array = array

    def cpu(self) -> np.ndarray:
        return self._array


class _BatchedDecoder:
    """nvImageCodec's decoder as the plugin asks for it: a frame decoded in the current batch is handed
    back from there, any other is decoded on its own."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.ready: dict[bytes, np.ndarray] = {}

    def decode(self, src: Any, params: Any = None) -> Any:
        if isinstance(src, (bytes, bytearray)) and (frame := self.ready.get(bytes(src))) is not None:
            return _HostFrame(frame)
        return self.decoder.decode(src, params=params)


def is_available(uid: UID) -> bool:
    """pydicom's plugin interface: whether this plugin decodes `uid` (only once enable() has succeeded)."""
    return _plugin is not None and str(uid) in SYNTAXES


def _decode_frame(src: bytes, runner: Any) -> bytes | bytearray:
    """pydicom's plugin interface: one frame, decoded by nvImageCodec's plugin, one call at a time."""
    with _lock:
        return _plugin._decode_frame(src, runner)


# What nvImageCodec prints for a codec extension whose CUDA library is missing, and which of those the node
# uses (the decoders above); nvTIFF is missing wherever its wheel is not installed, and DICOM never needs it.
_MISSING_LIBRARY = re.compile(r"Failed to load (\w+) library")
_INSTALL_HINT = "Note: If using nvImageCodec"  # the line after a missing library's: which wheel has it
_ITS_OWN = re.compile(rf"^(Failed to load \w+ library|{_INSTALL_HINT}|\[(ERROR|WARNING)\])")  # colours taken off
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
USED_LIBRARIES = {"nvjpeg2k": "JPEG 2000 and HTJ2K", "nvjpeg": "JPEG"}


@contextlib.contextmanager
def _library_output_logged() -> Iterator[None]:
    """nvImageCodec's library writes to the process's stderr, not to Python's logging: when it loads, three
    raw lines per codec extension whose library is missing, one of them an [ERROR] (on a GPU node: nvTIFF's,
    at every worker start). Meanwhile stderr goes to a file; then each missing library is logged once, as a
    warning where the node uses it, and whatever else was written (another thread's log lines) goes on to
    stderr as it was."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    with _stderr_lock, tempfile.TemporaryFile() as held:
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to keep clean
            yield
            return
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:  # also when the import fails: what the library said before it did may say why
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            _log_library_output(held.read().decode(errors="replace"))


def _log_library_output(text: str) -> None:
    missing, others = [], []
    for line in text.splitlines(keepends=True):
        plain = _ANSI.sub("", line)
        if not _ITS_OWN.match(plain):
            others.append(line)
        elif m := _MISSING_LIBRARY.search(plain):  # said twice: "nvjpeg2k" plainly, "nvJPEG2000" as an [ERROR]
            lib = m.group(1).lower().replace("nvjpeg2000", "nvjpeg2k")
            if lib not in missing:
                missing.append(lib)
        elif not plain.startswith(_INSTALL_HINT):
            log.warning("GPU decode: nvImageCodec says: %s", plain.strip())
    for lib in missing:
        if lib in USED_LIBRARIES:
            log.warning("GPU decode: nvImageCodec found no %s library, which it decodes %s slices with: pip install "
                        "nvidia-%s-cu12 (-cu13 for CUDA 13) in the node's environment; until then those slices may "
                        "be decoded on the CPU", lib, USED_LIBRARIES[lib], lib)
        else:
            log.info("GPU decode: nvImageCodec found no %s library (not used for DICOM slices)", lib)
    if others:
        os.write(2, "".join(others).encode())


def _import() -> tuple[Any, str | None]:
    """(nvImageCodec's pydicom plugin module, None), or (None, why not); loads its library, starts no GPU."""
    try:
        with _library_output_logged():
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
        with _lock, _library_output_logged():
            nv_decoder = plugin._get_decoder_resources()  # made now: a missing library is said at start
    except Exception as exc:  # noqa: BLE001 - a missing CUDA library or driver: the CPU decoders stay
        return f"nvImageCodec's decoder cannot start on {device}: {type(exc).__name__}: {exc}"
    _plugin = plugin
    _use_batches(plugin, nv_decoder)
    for decoder in _DECODERS:
        if PLUGIN not in decoder.available_plugins:
            decoder.add_plugin(PLUGIN, (__name__, "_decode_frame"))
    return None


def _use_batches(plugin: Any, decoder: Any) -> None:
    """Have the plugin ask for a _BatchedDecoder from now on. Its decoder is the module's global
    `_NVIMGCODEC_DECODER` (nvImageCodec 0.8-0.9); a release without it decodes slice by slice, as before."""
    global _batched
    if isinstance(decoder, _BatchedDecoder):  # enabled before in this process
        _batched = decoder
    elif getattr(plugin, "_NVIMGCODEC_DECODER", None) is decoder and getattr(plugin, "nvimgcodec", None):
        _batched = plugin._NVIMGCODEC_DECODER = _BatchedDecoder(decoder)
    else:
        log.info("GPU decode: slices are decoded one call each (this nvImageCodec has no decoder to batch for)")


def disable() -> None:
    """Back to pydicom's CPU decoders in this process (tests)."""
    global _plugin, _failed_once, _batched
    if _batched is not None and getattr(_plugin, "_NVIMGCODEC_DECODER", None) is _batched:
        _plugin._NVIMGCODEC_DECODER = _batched.decoder
    _batched = None
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


def _batchable_frame(ds: Dataset) -> bytes | None:
    """The one frame of a single-frame, one-sample data set the GPU takes; None for any other (multi-frame
    and colour data keep the plugin's per-frame handling)."""
    if not takes(ds) or "PixelData" not in ds or int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return None
    try:
        return bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    except Exception:  # noqa: BLE001 - a damaged encapsulation: the per-frame call says what is wrong
        return None


@contextlib.contextmanager
def batch(datasets: Sequence[Dataset]) -> Iterator[None]:
    """Within: these data sets' slices are decoded already, in batches of BATCH_FRAMES, and pixel_array
    takes each from there. A batch that fails leaves its slices to the per-frame call (and its fall-back)."""
    if _batched is None:
        yield
        return
    frames = [f for f in map(_batchable_frame, datasets) if f is not None]
    ready: dict[bytes, np.ndarray] = {}
    params = _plugin.nvimgcodec.DecodeParams(allow_any_depth=True,
                                            color_spec=_plugin.nvimgcodec.ColorSpec.UNCHANGED)  # the plugin's, grey
    for start in range(0, len(frames), BATCH_FRAMES):
        chunk = frames[start:start + BATCH_FRAMES]
        try:
            with _lock:
                images = _batched.decoder.decode(chunk, params=params)
            for src, image in zip(chunk, images):
                if image is not None:  # None: this frame is not decodable here; its own call says why
                    ready[src] = np.ascontiguousarray(np.asarray(image.cpu()))
        except Exception as exc:  # noqa: BLE001 - the per-frame path decodes them, or falls back to the CPU
            log.info("GPU decode: a batch of %d slices failed, decoding them one by one error=%s",
                     len(chunk), f"{type(exc).__name__}: {exc}")
    with _lock:  # beside another batch (a prefetch while a job reads): both stay
        _batched.ready.update(ready)
    try:
        yield
    finally:
        with _lock:
            for src in ready:
                _batched.ready.pop(src, None)


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
