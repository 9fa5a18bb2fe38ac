"""Series loading: the direct read of uncompressed pixel data gives what pydicom's decoding gives, in every
syntax the generator writes, and the loader's checks still name the file or instance at fault."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from node.run.decode_pool import DecodeError, decode_files, slow_to_decode
from node.run.series_loader import SeriesLoadError, load_series, read_file, read_file_decoded
from node.synth import write_chest_ct
from node.synth.chest_ct import SUPPORTED_SYNTAXES

SMALL = dict(slices=10, rows=48, cols=48, pixel_spacing=7.5, seed=3)
NATIVE = ("ExplicitVRLittleEndian", "ImplicitVRLittleEndian")


def reference(files: list[Path]) -> tuple[np.ndarray, list[str]]:
    """The volume as pydicom decodes it (pixel_array, rescale), slices sorted along the plane normal."""
    ds = [pydicom.dcmread(f) for f in files]
    iop = np.asarray(ds[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    ds.sort(key=lambda d: float(np.asarray(d.ImagePositionPatient, float) @ normal))
    vol = np.stack([d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0))
                    for d in ds]).astype(np.float32)
    return vol, [str(d.SOPInstanceUID) for d in ds]


def rewrite(files: list[Path], change) -> None:  # type: ignore[no-untyped-def]
    for f in files:
        ds = pydicom.dcmread(f)
        change(ds)
        ds.save_as(f, enforce_file_format=True)


@pytest.mark.parametrize("ts_name", sorted(SUPPORTED_SYNTAXES))
def test_every_syntax_loads_as_pydicom_decodes_it(tmp_path, ts_name):
    r = write_chest_ct(tmp_path / "ct", transfer_syntax=ts_name, **SMALL)
    files = list(reversed(r.files))  # the loader sorts by position, not by the order given
    vol, headers = load_series(files)
    want, uids = reference(files)
    assert np.array_equal(vol.pixels, want)
    assert [str(h.SOPInstanceUID) for h in headers] == uids == list(vol.sop_instance_uids)
    assert all("PixelData" not in h for h in headers)  # one copy of the pixels: the volume's
    assert all(h.buffer is None for h in headers)  # and no header holds on to its file's bytes
    ds, pixels = read_file(files[0])
    assert (pixels is not None) == (ts_name in NATIVE), "uncompressed little endian is read directly, the rest by pydicom"
    if pixels is not None and ds.BitsStored == ds.BitsAllocated:
        # a view of the file's bytes: no second buffer per slice (_native_pixels says why)
        root = pixels
        while isinstance(root, np.ndarray):
            root = root.base
        assert isinstance(root, bytes) and len(root) == Path(files[0]).stat().st_size


@pytest.mark.parametrize("ts_name", NATIVE)
@pytest.mark.parametrize("signed", [True, False])
def test_bits_stored_below_bits_allocated_keeps_the_stored_bits(tmp_path, ts_name, signed):
    r = write_chest_ct(tmp_path / "ct", transfer_syntax=ts_name, **SMALL)

    def to_12_bits(ds):  # type: ignore[no-untyped-def]
        arr = ds.pixel_array.astype(np.int32) + 1024  # 0..4095 in 12 bits
        stored = (arr & 0x0FFF) | 0xA000  # garbage above the stored bits, which readers must ignore
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
        ds.PixelData = stored.astype(np.uint16).tobytes()

    rewrite(r.files, to_12_bits)
    assert read_file(r.files[0])[1] is not None
    vol, _ = load_series(r.files)
    assert np.array_equal(vol.pixels, reference(r.files)[0])


def test_an_element_after_the_pixel_data_is_kept_in_the_header(tmp_path):
    r = write_chest_ct(tmp_path / "ct", **SMALL)
    rewrite(r.files[:1], lambda ds: setattr(ds, "DataSetTrailingPadding", b"\0\0"))
    ds, pixels = read_file(r.files[0])
    assert pixels is None and "DataSetTrailingPadding" in ds  # read by pydicom, whole
    vol, _ = load_series(r.files)
    assert np.array_equal(vol.pixels, reference(r.files)[0])


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(SeriesLoadError, match="series has no instances"):
        load_series([])
    r = write_chest_ct(tmp_path / "ct", **SMALL)
    rewrite(r.files[3:4], lambda ds: delattr(ds, "ImagePositionPatient"))
    with pytest.raises(SeriesLoadError, match=rf"{r.files[3]}: ImagePositionPatient is missing; series .* "
                                              r"cannot be read as a volume"):
        load_series(r.files)

    r = write_chest_ct(tmp_path / "dup", **SMALL)
    pos = pydicom.dcmread(r.files[0]).ImagePositionPatient
    rewrite(r.files, lambda ds: setattr(ds, "ImagePositionPatient", pos))
    with pytest.raises(SeriesLoadError, match="duplicate slice positions"):
        load_series(r.files)

    r = write_chest_ct(tmp_path / "size", **SMALL)
    other = write_chest_ct(tmp_path / "other", **{**SMALL, "rows": 32, "cols": 32, "study_uid": r.study_uid})
    odd = pydicom.dcmread(other.files[0])
    odd.SeriesInstanceUID = pydicom.dcmread(r.files[0]).SeriesInstanceUID
    odd.save_as(r.files[0], enforce_file_format=True)
    with pytest.raises(SeriesLoadError, match=r"32x32 differs from 48x48|48x48 differs from 32x32"):
        load_series(r.files)

    r = write_chest_ct(tmp_path / "cut", **SMALL)  # cut off inside the pixel data element's header
    with open(r.files[2], "rb") as f:
        pydicom.dcmread(f, stop_before_pixels=True)
        header = f.tell()  # where the pixel data element starts
    Path(r.files[2]).write_bytes(Path(r.files[2]).read_bytes()[:header + 10])
    with pytest.raises(SeriesLoadError, match=rf"{r.files[2]}: cannot be read as DICOM \(error: .*\); check the "
                                              r"file with dcmdump"):
        load_series(r.files)


COMPRESSED_SLOW = ("JPEG2000Lossless", "JPEGLSLossless")


@pytest.mark.parametrize("ts_name", COMPRESSED_SLOW)
def test_compressed_slices_decode_in_processes_as_pydicom_decodes_them(tmp_path, ts_name):
    r = write_chest_ct(tmp_path / "ct", transfer_syntax=ts_name, **{**SMALL, "slices": 20})
    paths = [str(f) for f in r.files]
    arrays = decode_files(paths, processes=2)
    assert all(np.array_equal(a, pydicom.dcmread(p).pixel_array) for a, p in zip(arrays, paths))
    assert not mp.active_children(), "decoding processes end with the call"
    assert slow_to_decode(read_file(paths[0])[0])
    vol, headers = load_series(list(reversed(r.files)))  # 20 slices: in processes where there are 2 CPUs
    assert np.array_equal(vol.pixels, reference(r.files)[0])
    assert all("PixelData" not in h for h in headers)


MAIN_SCRIPT = """
import sys
with open(sys.argv[1], "a") as runs:
    runs.write(__name__ + "\\n")  # each time this script runs, as the main module or again in a process
if __name__ == "__main__":
    from node.run.decode_pool import decode_files
    decode_files(sys.argv[2:], processes=2)
"""


@pytest.mark.parametrize("run_as", ["file", "module"])
def test_decode_processes_do_not_run_the_callers_main_module_again(tmp_path, run_as):
    """A job's process is started from the `ainode` script or `python -m node.cli`, whose imports took each
    decode process 0.5 s when multiprocessing ran them again there (decode_pool._main_left_out)."""
    r = write_chest_ct(tmp_path / "ct", transfer_syntax="JPEG2000Lossless", **SMALL)
    script, runs = tmp_path / "main_script.py", tmp_path / "main.runs"
    script.write_text(MAIN_SCRIPT)
    repo = Path(__file__).resolve().parents[1]
    main = [str(script)] if run_as == "file" else ["-m", "main_script"]
    subprocess.run([sys.executable, *main, str(runs), *map(str, r.files)], check=True, timeout=120, cwd=repo,
                   env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{repo}"})
    assert runs.read_text().split() == ["__main__"]  # before the fix: __main__, __mp_main__, __mp_main__


def test_rle_is_decoded_in_the_jobs_process(tmp_path):
    r = write_chest_ct(tmp_path / "ct", transfer_syntax="RLELossless", **SMALL)
    assert not slow_to_decode(read_file(r.files[0])[0]), "RLE decodes faster than a slice crosses a pipe"


def test_a_slice_that_cannot_be_decoded_is_named(tmp_path):
    r = write_chest_ct(tmp_path / "ct", transfer_syntax="JPEG2000Lossless", **{**SMALL, "slices": 20})
    bad = r.files[7]
    rewrite([bad], lambda ds: setattr(ds, "PixelData", encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])))
    with pytest.raises(DecodeError, match=rf"{bad}: its pixel data cannot be decoded"):
        decode_files([str(f) for f in r.files], processes=2)
    assert not mp.active_children()
    with pytest.raises(SeriesLoadError, match=rf"series .*: {bad}: its pixel data cannot be decoded"):
        load_series(r.files)


def test_read_ahead_decodes_compressed_slices(tmp_path):
    r = write_chest_ct(tmp_path / "ct", transfer_syntax="JPEG2000Lossless", **SMALL)
    ds, pixels = read_file_decoded(r.files[0])
    assert "PixelData" not in ds
    assert np.array_equal(pixels, pydicom.dcmread(r.files[0]).pixel_array)


def test_a_slice_decoded_in_the_jobs_process_is_named_too(tmp_path):
    r = write_chest_ct(tmp_path / "ct", transfer_syntax="RLELossless", **SMALL)
    bad = r.files[4]
    rewrite([bad], lambda ds: setattr(ds, "PixelData", encapsulate([b"\x00" * 64])))
    with pytest.raises(SeriesLoadError, match=rf"series .*: {bad}: its pixel data cannot be decoded"):
        load_series(r.files)


def test_prefetch_decodes_in_processes_of_its_own_at_a_lower_priority(tmp_path, monkeypatch):
    """The next job's input, loaded while a job runs, is decoded in processes apart from the job's (in the
    job's process the decoder would hold its GIL against the running job), one per CPU as for the job's own
    load, but niced so that the running job keeps its CPUs."""
    from node.run import decode_pool, prefetch, series_loader
    from node.run.job_process import JobSpec, PluginCache, load_input
    from node.run.prefetch import Prefetcher

    r = write_chest_ct(tmp_path / "ct", transfer_syntax="JPEG2000Lossless", **{**SMALL, "slices": 20})
    calls = []

    def recording(paths, processes=None, stop=None, nice=0):  # type: ignore[no-untyped-def]
        calls.append((processes, nice))
        return decode_files(paths, processes, stop, nice)

    monkeypatch.setattr(series_loader, "decode_files", recording)
    monkeypatch.setattr(decode_pool, "decode_files", recording)  # BackgroundDecode's
    monkeypatch.setattr(decode_pool, "processes_for", lambda n: 2)  # as on any machine with 2+ CPUs
    monkeypatch.setattr(prefetch, "processes_for", lambda n: 1)  # one CPU: still not in the job's process
    spec = JobSpec(job_id=1, study_uid=r.study_uid, plugin="none", series={r.series_uid: list(map(str, r.files))},
                   temp_dir=str(tmp_path), validate=False)
    prefetcher = Prefetcher(PluginCache({}))
    prefetcher.start(spec)
    loaded = prefetcher.take(spec)
    assert loaded is not None and calls == [(1, decode_pool.BACKGROUND_NICE)]
    assert np.array_equal(loaded.volumes[0].pixels, reference(r.files)[0])
    load_input(spec, None)
    assert calls == [(1, decode_pool.BACKGROUND_NICE), (2, 0)]


def test_a_prefetchs_read_and_convert_threads_run_at_a_lower_priority(tmp_path, monkeypatch):
    """The next job's files are read and converted in threads niced as its decoders are, so that the running
    job keeps the CPUs; the loading thread keeps its own priority (a decoding forkserver it starts, and so
    the job's own decoders, would inherit it), and a job's own load is not niced at all."""
    import threading

    from node.run import decode_pool, series_loader

    r = write_chest_ct(tmp_path / "ct", **{**SMALL, "slices": 12})
    seen: dict[str, set[int]] = {"read": set(), "convert": set()}

    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    caller = threading.get_ident()  # reads the first file itself, at its own priority

    def reading(path, pixels=True):  # type: ignore[no-untyped-def]
        if threading.get_ident() != caller:
            seen["read"].add(priority())
        return read_file(path, pixels)

    real_copyto = np.copyto

    def converting(dst, src, **kwargs):  # type: ignore[no-untyped-def]
        seen["convert"].add(priority())
        return real_copyto(dst, src, **kwargs)

    monkeypatch.setattr(series_loader, "read_file", reading)
    monkeypatch.setattr(series_loader.np, "copyto", converting)
    base = priority()
    niced = min(19, base + decode_pool.BACKGROUND_NICE)
    volume, _ = load_series(r.files, nice=decode_pool.BACKGROUND_NICE)
    assert seen == {"read": {niced}, "convert": {niced}} and priority() == base
    assert np.array_equal(volume.pixels, load_series(r.files)[0].pixels)
    seen = {"read": set(), "convert": set()}
    load_series(r.files)
    assert seen == {"read": {base}, "convert": {base}}


def test_decode_processes_run_at_the_niceness_asked_for(tmp_path):
    from node.run import decode_pool

    r = write_chest_ct(tmp_path / "ct", transfer_syntax="JPEG2000Lossless", **SMALL)
    pid, finish = _decoding_with_one_file_held(tmp_path, r.files[:2], 0, processes=1, nice=decode_pool.BACKGROUND_NICE)
    nice = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
    arrays = finish()
    assert nice == min(19, os.nice(0) + decode_pool.BACKGROUND_NICE)
    assert all(np.array_equal(a, pydicom.dcmread(f).pixel_array) for a, f in zip(arrays, r.files[:2]))


def test_decode_processes_0_decodes_in_this_process(tmp_path, monkeypatch):
    from node.run import series_loader

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a decode process was started")

    monkeypatch.setattr(series_loader, "decode_files", refuse)
    monkeypatch.setattr(series_loader, "BackgroundDecode", refuse)
    r = write_chest_ct(tmp_path / "ct", transfer_syntax="JPEG2000Lossless", **{**SMALL, "slices": 20})
    vol, _ = load_series(r.files, decode_processes=0)
    assert np.array_equal(vol.pixels, reference(r.files)[0])


def _forkserver_children() -> list[int]:
    from multiprocessing import forkserver

    server = forkserver._forkserver._forkserver_pid
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == server and fields[0] not in "ZX":
            found.append(int(stat.parent.name))
    return found


def _waits_in_open(pid: int) -> bool:
    """Blocked in open() (of a FIFO no one writes to)."""
    try:
        return (Path(f"/proc/{pid}/wchan").read_text() in ("fifo_open", "wait_for_partner")
                or Path(f"/proc/{pid}/syscall").read_text().split()[0] == "257")  # openat, x86-64
    except OSError:
        return False


def _decoding_with_one_file_held(tmp_path: Path, files: list[Path], held_index: int,
                                 **kwargs: object) -> tuple[int, Callable[[], list[np.ndarray]]]:
    """decode_files of `files` in a thread, with the file at `held_index` a FIFO, so that the process given it
    waits in open(). Returns that process's pid, and a function that puts the real file in place, kills the
    process (its files are then decoded in the caller) and returns what decode_files returned."""
    import shutil
    import signal
    import threading
    import time

    held = tmp_path / "held.dcm"
    os.mkfifo(held)
    paths = [str(held) if i == held_index else str(f) for i, f in enumerate(files)]
    result: dict[str, list[np.ndarray]] = {}
    caller = threading.Thread(target=lambda: result.update(arrays=decode_files(paths, **kwargs)), daemon=True)
    caller.start()
    deadline = time.monotonic() + 60
    waiting: list[int] = []
    while not waiting:
        assert time.monotonic() < deadline, "no decoding process reached the FIFO"
        time.sleep(0.1)
        try:
            waiting = [pid for pid in _forkserver_children() if _waits_in_open(pid)]
        except AttributeError:  # the forkserver has not started yet
            pass

    def finish() -> list[np.ndarray]:
        held.unlink()  # the waiting process keeps the FIFO it is opening; the caller will find the real file
        shutil.copy(files[held_index], held)
        os.kill(waiting[0], signal.SIGKILL)
        caller.join(60)
        assert not caller.is_alive()
        return result["arrays"]

    return waiting[0], finish


def test_a_decode_process_that_dies_mid_series_leaves_its_files_to_the_jobs_process(tmp_path, caplog):
    """Killed for memory, say: its files are decoded in the caller and the volume is whole."""
    r = write_chest_ct(tmp_path / "ct", transfer_syntax="JPEG2000Lossless", **SMALL)
    files = r.files[:4]
    _, finish = _decoding_with_one_file_held(tmp_path, files, 2, processes=2)  # the second process's first file
    arrays = finish()
    assert all(np.array_equal(a, pydicom.dcmread(f).pixel_array) for a, f in zip(arrays, files))
    assert "decode process died; decoding its files=2 in the job's process" in caplog.text


def test_a_compressed_series_decodes_while_its_headers_are_read(tmp_path, monkeypatch):
    """The job starts its decode processes on every file it has to read as soon as the first file shows the
    series is compressed; a file that turns out not to be still loads as pydicom reads it."""
    from node.run import decode_pool, series_loader

    monkeypatch.setattr(decode_pool, "processes_for", lambda n: 2)  # as on any machine with 2+ CPUs
    r = write_chest_ct(tmp_path / "ct", transfer_syntax="JPEG2000Lossless", **{**SMALL, "slices": 12})
    plain = write_chest_ct(tmp_path / "plain", **{**SMALL, "slices": 12})
    files = [r.files[0], *plain.files[1:]]  # the same slices; all but the first uncompressed
    for f, src in zip(files[1:], r.files[1:]):  # of the same series, so that they form one volume
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = pydicom.dcmread(src).SeriesInstanceUID
        ds.save_as(f, enforce_file_format=True)
    started = []
    monkeypatch.setattr(decode_pool.BackgroundDecode, "__init__",
                        lambda self, paths, *args, _init=decode_pool.BackgroundDecode.__init__:
                        (started.append(list(paths)), _init(self, paths, *args))[1])
    vol, headers = load_series(files)
    assert started == [[str(f) for f in files]]
    assert np.array_equal(vol.pixels, reference(files)[0])
    assert all("PixelData" not in h for h in headers)


def test_a_header_that_cannot_be_read_stops_the_background_decode(tmp_path):
    r = write_chest_ct(tmp_path / "ct", transfer_syntax="JPEG2000Lossless", **{**SMALL, "slices": 20})
    Path(r.files[3]).write_bytes(Path(r.files[3]).read_bytes()[:200])  # cut inside the header
    with pytest.raises(SeriesLoadError, match=rf"{r.files[3]}: ImagePositionPatient is missing"):
        load_series(r.files, decode_processes=2)
    assert not mp.active_children() and not _forkserver_children()
    Path(r.files[3]).write_bytes(b"not DICOM")
    with pytest.raises(SeriesLoadError, match=rf"{r.files[3]}: cannot be read as DICOM"):
        load_series(r.files, decode_processes=2)
    assert not mp.active_children() and not _forkserver_children()


def test_background_decode_cancel_kills_a_process_that_waits(tmp_path):
    """cancel() returns even while a decode process is stuck (here in open() of a FIFO no one writes)."""
    import threading
    import time

    from node.run.decode_pool import BackgroundDecode

    r = write_chest_ct(tmp_path / "ct", transfer_syntax="JPEG2000Lossless", **SMALL)
    held = tmp_path / "held.dcm"
    os.mkfifo(held)
    decode = BackgroundDecode([str(r.files[0]), str(held)], 2)
    deadline = time.monotonic() + 60
    while not any(_waits_in_open(pid) for pid in _forkserver_children()):
        assert time.monotonic() < deadline, "no decoding process reached the FIFO"
        time.sleep(0.1)
    canceller = threading.Thread(target=decode.cancel, daemon=True)
    canceller.start()
    canceller.join(30)
    assert not canceller.is_alive(), "cancel() did not return"
    deadline = time.monotonic() + 10
    while _forkserver_children():
        assert time.monotonic() < deadline, "a decode process outlived cancel()"
        time.sleep(0.1)
    with pytest.raises(decode_pool_stopped()):
        decode.result()


def decode_pool_stopped() -> type[BaseException]:
    from node.run.decode_pool import DecodeStopped
    return DecodeStopped
