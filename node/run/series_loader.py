"""Reads a spooled series into one physical-unit volume for a plugin.

Uncompressed little-endian pixel data (what most PACS send, and what the node spools as received) is read
straight from the file into the volume: the header is parsed up to the pixel data, and the pixel bytes
are viewed with numpy, without pydicom's per-slice decoding. Compressed (or otherwise unusual) pixel data
goes through pydicom's decoders; JPEG 2000, JPEG-LS and JPEG in several processes when there are more than
a few slices (decode_pool.py: those decoders hold the GIL), which start as soon as the first file shows the
series is compressed, while the other headers are read. Files are read by a few threads, so file I/O
overlaps header parsing.
"""

from __future__ import annotations

import io
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.plugin_api import SeriesVolume
from node.run import gpu_decode
from node.run.decode_pool import (BackgroundDecode, DecodeError, decode_files, pixels_of, processes_to_use,
                                  slow_to_decode)

if TYPE_CHECKING:
    from node.run.read_ahead import ReadAhead

READ_THREADS = 2  # file reads release the GIL; header parsing does not, so more threads buy nothing
CONVERT_THREADS = 2  # numpy's conversion to physical units releases the GIL
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
UNDEFINED_LENGTH = 0xFFFFFFFF


class SeriesLoadError(ValueError):
    pass


def _lower_priority(nice: int) -> None:
    """Run this thread `nice` steps lower (Linux: niceness is per thread): a prefetch's read and convert
    threads then give the CPU to the running job. Its postprocess took 0.085 s beside them at equal
    priority and 0.02 s without them (1-slot stand-in burst on 2 cores, bench/RESULTS.md 2026-12-06)."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:  # not permitted or not supported: the threads run at the job's priority
        pass


def _normal(iop: Sequence[float]) -> np.ndarray:
    row, col = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    return np.cross(row, col)


def _native_dtype(ds: Dataset) -> np.dtype | None:
    """The stored pixel type of a single-frame grayscale image with whole-byte samples, else None."""
    try:
        if int(ds.get("SamplesPerPixel", 1)) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
            return None
        bits, stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
        signed = int(ds.PixelRepresentation) == 1
    except (AttributeError, TypeError, ValueError):
        return None
    if bits not in (8, 16, 32) or not 0 < stored <= bits:
        return None
    return np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")


def _native_pixels(ds: Dataset, data: bytes, pos: int) -> np.ndarray | None:
    """The stored values of uncompressed little-endian pixel data at `pos` of the file's bytes (just after
    the header), as pydicom's pixel_array gives them; None where pydicom must decode (any doubt).

    The array is a read-only view of `data`, not a copy: a second buffer the size of the slice is a copy
    plus a page fault per 4 KB while the first is alive (reading 300 CT slices ahead: 0.85 -> 0.71 ms a
    slice), and reading ahead does this for every file as it arrives, beside the receiver."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or "Rows" not in ds or "Columns" not in ds:
        return None
    dtype = _native_dtype(ds)
    if dtype is None:
        return None
    head_size = 12 if ts == ExplicitVRLittleEndian else 8
    head = data[pos:pos + head_size]
    if len(head) < head_size or head[:4] != PIXEL_DATA_TAG:  # a file cut short: pydicom says what is wrong
        return None
    if ts == ExplicitVRLittleEndian:
        if head[4:6] not in (b"OB", b"OW"):
            return None
        (length,) = struct.unpack("<I", head[8:12])
    else:
        (length,) = struct.unpack("<I", head[4:8])
    count = int(ds.Rows) * int(ds.Columns)
    # The element must hold exactly one frame (an odd 8-bit frame has one pad byte) and end the file:
    # elements after the pixel data would be missing from the header otherwise.
    start = pos + len(head)
    if length == UNDEFINED_LENGTH or length not in (count * dtype.itemsize, count * dtype.itemsize + 1) \
            or start + length != len(data):
        return None
    arr = np.frombuffer(data, dtype, count, offset=start).reshape(int(ds.Rows), int(ds.Columns))
    bits = dtype.itemsize * 8
    stored = int(ds.get("BitsStored", bits))
    if stored < bits:  # keep the stored bits only, sign-extended for signed data (as pydicom does)
        shift = bits - stored
        arr = (arr << shift) >> shift if dtype.kind == "i" else arr & ((1 << stored) - 1)
    return arr


def read_file(path: Path | str, pixels: bool = True) -> tuple[Dataset, np.ndarray | None]:
    """The header and, where it can be read directly, the stored pixel values (else the full dataset, or
    with `pixels` False the header alone: the file's pixels are decoded elsewhere).

    The file is read with one call (no GIL held) and parsed from memory, where pydicom's many small reads
    cost no system calls."""
    data = Path(path).read_bytes()
    fp = io.BytesIO(data)
    try:
        ds = dcmread(fp, stop_before_pixels=True)
        stored = _native_pixels(ds, data, fp.tell()) if pixels else None
        if stored is None and pixels:
            ds = dcmread(io.BytesIO(data))
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom's errors on a damaged file name neither file nor cause
        raise SeriesLoadError(f"{path}: cannot be read as DICOM ({type(exc).__name__}: {exc}); check the file "
                              f"with dcmdump") from None
    ds.filename = str(path)  # as dcmread(path) sets it
    # pydicom keeps the BytesIO it read from, so every header would hold its whole file (158 MB for a
    # 300-slice CT, beside the volume) until the job ends; nothing reads it again.
    ds.buffer = None
    return ds, stored


def _header_only(path: Path | str) -> tuple[Dataset, None]:
    return read_file(path, pixels=False)  # type: ignore[return-value]


class TooLargeToDecode(SeriesLoadError):
    """The pixel data would decode to more than the caller may hold."""


def decoded_bytes(ds: Dataset) -> int:
    """What `ds`'s pixel data decodes to in numpy: every frame and sample, whole bytes per sample (1-bit
    data unpacks to one byte a pixel); 0 where the header does not say."""
    try:
        bits = int(ds.BitsAllocated)
        return (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1)
                * int(ds.get("NumberOfFrames", 1) or 1) * max(1, bits // 8))
    except (AttributeError, TypeError, ValueError):
        return 0


def read_file_decoded(path: Path | str, max_bytes: int | None = None) -> tuple[Dataset, np.ndarray]:
    """read_file, with compressed pixel data decoded as well: for reading ahead, in a worker that is idle
    while the study arrives, so the job does not decode those slices after it is complete.

    A compressed file may decode to many times its size (a multi-frame JPEG 2000 instance: GBs from a file
    well under the read-ahead budget); past `max_bytes` it is not decoded (TooLargeToDecode), and the job
    reads it itself, under run.memory_limit_mb."""
    ds, pixels = read_file(path)
    if pixels is None:
        if max_bytes is not None and (size := decoded_bytes(ds)) > max_bytes:
            raise TooLargeToDecode(f"{path}: its pixel data decodes to {size} bytes, more than {max_bytes}")
        pixels = pixels_of(ds, str(path))
        del ds.PixelData
    return ds, pixels


def load_series(paths: Sequence[Path | str], ahead: ReadAhead | None = None,
                decode_processes: int | None = None, nice: int = 0) -> tuple[SeriesVolume, list[Dataset]]:
    """Volume (slices sorted along the plane normal) and the headers in the same order.

    The returned datasets have no pixel data, to keep memory to one copy of the volume. Files that `ahead`
    has read already are taken from it. `decode_processes`: how many processes decode JPEG 2000, JPEG-LS
    and JPEG slices (decode_pool.processes_to_use: by default one per CPU, and none where that is one; 0:
    none, this process decodes them). `nice`: added to those processes' niceness (decode_pool.BACKGROUND_NICE),
    and to the read and convert threads'; the calling thread's own is left as it is, so a decoding
    forkserver it starts has the job's priority.
    """
    if not paths:
        raise SeriesLoadError("series has no instances")
    read = [ahead.take(str(p)) for p in paths] if ahead is not None else [None] * len(paths)
    missing = [p for p, r in zip(paths, read) if r is None]
    early: BackgroundDecode | None = None
    try:
        if missing:
            first = read_file(missing[0])
            n = processes_to_use(len(missing), decode_processes)
            if first[1] is None and slow_to_decode(first[0]) and n and len(missing) > 1:
                # The rest are most likely compressed the same way: their processes start decoding now, while
                # the headers are read here (a file that is not compressed comes back as pydicom reads it).
                early = BackgroundDecode([str(p) for p in missing], n, nice)
            with ThreadPoolExecutor(min(READ_THREADS, len(missing)), initializer=_lower_priority,
                                    initargs=(nice,)) as pool:
                fresh = iter([first, *pool.map(read_file if early is None else _header_only, missing[1:])])
            read = [r if r is not None else next(fresh) for r in read]
        return _volume(paths, read, early, decode_processes, nice)
    finally:
        if early is not None:
            early.cancel()  # returns at once once the decoding is done


def _volume(paths: Sequence[Path | str], read: list[tuple[Dataset, np.ndarray | None]], early: BackgroundDecode | None,
            decode_processes: int | None, nice: int) -> tuple[SeriesVolume, list[Dataset]]:
    datasets = [ds for ds, _ in read]
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
    read = [read[i] for i in order]
    if early is not None:
        try:
            decoded = early.result()
        except DecodeError as exc:
            raise SeriesLoadError(f"series {series_uid}: {exc}") from None
        for k, (ds, stored) in enumerate(read):
            if stored is None and ds.filename in decoded:
                if "PixelData" in ds:  # the first file, read whole to see how the series is encoded
                    del ds.PixelData
                read[k] = (ds, decoded[ds.filename])
    # Slices the GPU decodes (run.gpu_decode) are not slow_to_decode: decoded below, in this process.
    undecoded = [k for k, (ds, stored) in enumerate(read) if stored is None and slow_to_decode(ds)]
    processes = processes_to_use(len(undecoded), decode_processes)
    if undecoded and processes:  # JPEG 2000, JPEG-LS, JPEG: decoded in processes, side by side
        try:
            arrays = decode_files([str(paths[order[k]]) for k in undecoded], processes, nice=nice)
        except DecodeError as exc:
            raise SeriesLoadError(f"series {series_uid}: {exc}") from None
        for k, arr in zip(undecoded, arrays):
            ds = read[k][0]
            del ds.PixelData
            read[k] = (ds, arr)
    datasets = [ds for ds, _ in read]
    positions = positions[order]
    rows, cols = int(first.Rows), int(first.Columns)
    for ds in datasets:
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise SeriesLoadError(
                f"instance {ds.SOPInstanceUID}: {ds.Rows}x{ds.Columns} differs from {rows}x{cols} in series {series_uid}"
            )
    vol = np.empty((len(datasets), rows, cols), dtype=np.float32)

    def to_units(k: int, item: tuple[Dataset, np.ndarray | None]) -> None:  # numpy releases the GIL
        ds, stored = item
        arr = pixels_of(ds, ds.filename) if stored is None else stored
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope == 1:
            np.copyto(vol[k], arr, casting="unsafe")  # exact, as arr * 1.0 is
        else:
            np.multiply(arr, slope, out=vol[k], casting="unsafe")
        vol[k] += intercept
        if stored is None:
            del ds.PixelData

    # Slices the GPU decodes: in batches first (one call per slice costs 8x as much); to_units takes them.
    with gpu_decode.batch([ds for ds, stored in read if stored is None]), \
            ThreadPoolExecutor(CONVERT_THREADS, initializer=_lower_priority, initargs=(nice,)) as pool:
        try:
            list(pool.map(to_units, range(len(read)), read))
        except DecodeError as exc:
            raise SeriesLoadError(f"series {series_uid}: {exc}") from None
    del read
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
