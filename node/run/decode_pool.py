"""Decodes a series' compressed slices in several processes at once.

pydicom's JPEG 2000 and JPEG-LS decoders (pylibjpeg-openjpeg, pyjpegls) hold the GIL: on a 2-core VM a
512x512 slice takes 20 ms (JPEG 2000) or 14 ms (JPEG-LS) in one thread and no less in two, so a job read a
300-slice series in 6.5 or 4.0 s, all of it after the study was complete. Here each CPU the job may use
decodes its share of the files in a process of its own.

The processes fork from a forkserver that has pydicom and its decoders imported, so one starts in
milliseconds; each hands back the stored values of its files (pydicom's `pixel_array`) and exits. They die
with the forkserver, which dies with the job's process; a process whose reader is gone also stops at its
next send (a broken pipe), so none outlives the job.

The values do not pass through the pipe: each process writes them into an anonymous memory file of its own
(memfd, gone once the last process holding it ends, so a kill leaves nothing in /dev/shm) and sends only
where; the job's process maps them. Through the pipe, a 512 KB slice took about 9 reads, each of which had
to take the GIL back from the job's other threads: beside a busy thread a 300-slice JPEG 2000 series
took 1.43x as long to decode (bench/RESULTS.md, 2026-12-05 19:26).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing as mp
import os
import sys
import threading
import warnings
from multiprocessing import reduction
from multiprocessing.connection import Connection, wait
from typing import Iterator, Sequence

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

from node.cpus import usable_cpus
from node.lifeline import die_with_parent
from node.run import gpu_decode

log = logging.getLogger("ainode.run")

# Decoding these costs 10-25 ms a 512x512 slice; RLE (2 ms) or deflate is faster in the job's process than
# the trip of its slices through a pipe.
SLOW_SYNTAXES = frozenset(JPEG2000TransferSyntaxes + JPEGLSTransferSyntaxes + JPEGTransferSyntaxes)
MIN_FILES_PER_PROCESS = 8  # fewer, and starting the process costs about what it saves
MAX_PROCESSES = 16  # each holds one slice at a time; beyond this the page cache, not the CPUs, is the limit

try:  # imported here so that the forkserver has them loaded before it forks a decoding process
    import pydicom.pixels  # noqa: F401
    import openjpeg  # noqa: F401 - JPEG 2000
    import jpeg_ls  # noqa: F401 - JPEG-LS
    import libjpeg  # noqa: F401 - JPEG
    import rle  # noqa: F401 - RLE Lossless
except ImportError:  # a decoder that is not installed: pydicom says which when a file needs it
    pass


class DecodeError(ValueError):
    """A file's pixel data cannot be decoded; the message names the file."""


def pixels_of(ds: Dataset, where: str) -> np.ndarray:
    """The data set's stored pixel values, as pydicom decodes them (on the GPU where run.gpu_decode has it,
    node/run/gpu_decode.py); a failure names `where` (its file)."""
    try:
        return gpu_decode.pixel_array(ds) if gpu_decode.takes(ds) else ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - any decoder error: name the file it came from
        raise DecodeError(f"{where}: its pixel data cannot be decoded ({type(exc).__name__}: {exc}); "
                          f"check the file with dcmdump, or have the sender use another transfer syntax") from None


def decode_file(path: str) -> np.ndarray:
    """The file's stored pixel values, as pydicom decodes them."""
    try:
        ds = dcmread(path)
    except Exception as exc:  # noqa: BLE001 - the file changed or went since its header was read
        raise DecodeError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    return pixels_of(ds, path)


def slow_to_decode(ds: Dataset) -> bool:
    """Whether the file this header came from is worth decoding in another process: not where this process
    decodes it on its GPU (run.gpu_decode), which those processes would not have."""
    meta = getattr(ds, "file_meta", None)
    return (meta is not None and str(meta.get("TransferSyntaxUID", "")) in SLOW_SYNTAXES
            and not gpu_decode.takes(ds))


def processes_for(files: int) -> int:
    """How many processes decode `files` files: one per CPU this process may run on, each with a fair share."""
    return max(1, min(usable_cpus(), files // MIN_FILES_PER_PROCESS, MAX_PROCESSES))


def processes_to_use(files: int, requested: int | None) -> int:
    """How many processes decode `files` slow-to-decode slices; 0: the caller's process does. `requested`:
    that many (0 for none); None: processes_for, and none where that is one (one process would only add its
    start and the trip through it)."""
    if requested is None:
        n = processes_for(files)
        return n if n > 1 else 0
    return max(0, min(requested, files))


# The next job's slices, decoded while a job runs (node/run/prefetch.py), are decoded at this niceness: the
# running job (a stat study, say) keeps its CPUs, and the decoders take the idle ones (all of them once the
# job is done). At nice 10 a process gets about a tenth of what one at nice 0 gets of a CPU both want.
BACKGROUND_NICE = 10


def _context() -> mp.context.BaseContext:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


@contextlib.contextmanager
def _main_left_out() -> Iterator[None]:
    """Processes started meanwhile do not run the caller's main module again.

    A process forked by the forkserver runs the starting process's main module anew (multiprocessing's
    `prepare`: by its name if it was run with -m, else by its file) before its target. In a job's process
    that is `node.cli` (`python -m node.cli`) or the `ainode` script that imports it, and that import took
    about 0.5 s in each decode process: two processes decoding 30 JPEG 2000 slices took 0.85 s, against
    0.58 s in the job's own process and 0.33 s without it. Preloading "__main__" in the forkserver does not
    help on Python 3.11: the forkserver is passed no main path (it asks for a key `get_preparation_data`
    does not give). The decode processes need nothing from the main module (their target is this module's)."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    spec, path = getattr(main, "__spec__", None), main.__dict__.pop("__file__", None)
    main.__spec__ = None
    try:
        yield
    finally:
        main.__spec__ = spec
        if path is not None:
            main.__file__ = path


class SharedFile:
    """An anonymous memory file (memfd) that a decode process writes its slices into. Passed to the process
    as multiprocessing passes it a pipe: the descriptor is duplicated into the new process."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def create(cls) -> "SharedFile | None":
        """None where memfd_create is not there (not Linux): the slices then come through the pipe."""
        try:
            return cls(os.memfd_create("ainode-decode", os.MFD_CLOEXEC))
        except (AttributeError, OSError):
            return None

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return _rebuild_shared_file, (reduction.DupFd(self.fd),)

    def close(self) -> None:
        os.close(self.fd)


def _rebuild_shared_file(dupfd) -> SharedFile:  # type: ignore[no-untyped-def]
    return SharedFile(dupfd.detach())


def _page_aligned(n: int) -> int:
    """Where the next slice starts: every view of the mapping aligned for its dtype, whatever the slices
    before it held (the gaps are holes in the file and take no memory)."""
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def _take_slices(shared: SharedFile, written: list[tuple[int, int, str, tuple[int, ...]]],
                 out: list[np.ndarray | None]) -> None:
    """Put the slices a decode process wrote (index, offset, dtype, shape) into `out`: views of one
    copy-on-write mapping of its memory file (writable; the file is not changed), which lives as long as
    they do. One mapping, not one per slice: Python's mmap keeps a descriptor of its own for each."""
    if not written:
        return
    size = os.fstat(shared.fd).st_size
    try:
        data: mmap.mmap | bytearray = mmap.mmap(shared.fd, size, flags=mmap.MAP_PRIVATE,
                                                prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError:  # no address space or mapping left: a copy, read in one call
        data = bytearray(size)
        os.preadv(shared.fd, [data], 0)
    for i, offset, dtype, shape in written:
        count = int(np.prod(shape))
        out[i] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def _decode_share(conn: Connection, paths: list[str], shared: SharedFile | None = None, nice: int = 0) -> None:
    die_with_parent(check_started_by_parent=False)  # the forkserver, which ends when the job's process does
    if nice:
        os.nice(nice)
    # Nothing here logs: a decoder's error goes back through the pipe, and pydicom's own log lines and
    # warnings (which may quote a header value) would reach the node's log unformatted and unredacted.
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    offset = 0
    try:
        for path in paths:
            try:
                arr = decode_file(path)
            except DecodeError as exc:
                conn.send(("error", str(exc)))
                return
            if shared is None:
                conn.send(("ok", arr))
                continue
            try:
                _write_all(shared.fd, arr, offset)
            except OSError:  # out of memory for the file: this slice, and the rest, through the pipe
                shared = None
                conn.send(("ok", arr))
                continue
            conn.send(("at", offset, arr.dtype.str, arr.shape))
            offset += _page_aligned(arr.nbytes)
    except BrokenPipeError:  # the job's process is gone: nothing waits for the rest
        return
    finally:
        conn.close()
        if shared is not None:
            shared.close()


def _write_all(fd: int, arr: np.ndarray, offset: int) -> None:
    view = memoryview(np.ascontiguousarray(arr)).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


class DecodeStopped(Exception):
    """decode_files was told to stop (BackgroundDecode.cancel)."""


def decode_files(paths: Sequence[str], processes: int | None = None,
                 stop: threading.Event | None = None, nice: int = 0) -> list[np.ndarray]:
    """Each file's stored pixel values, in the order given. Raises DecodeError (naming the file) for a file
    that cannot be decoded. `processes`: how many processes decode them, as processes_to_use counts them
    (0: this process does). `stop`: once set, the processes are killed and DecodeStopped is raised.
    `nice`: added to the processes' niceness (BACKGROUND_NICE for a prefetch)."""
    n = processes_to_use(len(paths), processes)
    if n == 0:
        return [decode_file(str(p)) for p in paths]
    ctx = _context()
    # A process started from this one must not be daemonic (multiprocessing refuses children to one); the
    # job's process is daemonic only so that the node's exit never waits for it.
    was_daemon = mp.current_process().daemon
    mp.current_process().daemon = False
    out: list[np.ndarray | None] = [None] * len(paths)
    readers: dict[Connection, list[int]] = {}  # each process's pipe -> the indices it has yet to send
    files: dict[Connection, SharedFile] = {}  # each process's pipe -> the memory file it writes slices into
    written: dict[Connection, list[tuple[int, int, str, tuple[int, ...]]]] = {}  # slices in that file so far
    procs = []
    here: list[int] = []  # files of a process that could not start: decoded in this one
    try:
        for k in range(n):
            share = list(range(k * len(paths) // n, (k + 1) * len(paths) // n))  # neighbours: files read in order
            reader, writer = ctx.Pipe(duplex=False)
            shared = SharedFile.create()
            proc = ctx.Process(target=_decode_share, args=(writer, [str(paths[i]) for i in share], shared, nice),
                               name=f"ainode-decode-{k}", daemon=True)
            try:
                with _main_left_out():
                    proc.start()
            except Exception as exc:  # noqa: BLE001 - no process (a limit, a main module that starts one)
                log.warning("decode process not started; decoding its files=%d in the job's process error=%s",
                            len(share), f"{type(exc).__name__}: {exc}")
                reader.close()
                if shared is not None:
                    shared.close()
                here.extend(share)
                continue
            finally:
                writer.close()
            procs.append(proc)
            readers[reader] = share
            if shared is not None:
                files[reader], written[reader] = shared, []
        for i in here:
            out[i] = decode_file(str(paths[i]))
        while readers:
            ready = wait(list(readers), None if stop is None else 0.1)
            if stop is not None and stop.is_set():
                raise DecodeStopped()
            for reader in ready:
                left = readers[reader]
                try:
                    message = reader.recv()  # ("ok", values), ("at", offset, dtype, shape) or ("error", why)
                except EOFError:  # the process died (killed for memory?): decode its files here
                    log.warning("decode process died; decoding its files=%d in the job's process", len(left))
                    for i in left:
                        out[i] = decode_file(str(paths[i]))
                    left.clear()
                    message = ("died",)
                if message[0] == "error":
                    raise DecodeError(message[1])
                if message[0] == "ok":
                    out[left.pop(0)] = message[1]
                if message[0] == "at":
                    written[reader].append((left.pop(0), *message[1:]))
                if not left:
                    reader.close()
                    del readers[reader]
                    if reader in files:
                        shared = files.pop(reader)
                        _take_slices(shared, written.pop(reader), out)
                        shared.close()  # the mapping keeps the pages
    finally:
        mp.current_process().daemon = was_daemon
        for reader in readers:
            reader.close()
        for shared in files.values():
            shared.close()
        for proc in procs:
            if proc.is_alive():
                proc.join(0.5)
            if proc.is_alive():
                proc.kill()
                proc.join(1)
    return out  # type: ignore[return-value] - every index was filled, or an error was raised


class BackgroundDecode:
    """decode_files started at once in a thread of its own, so that its processes decode while the caller
    reads the same files' headers: for a 279-slice JPEG 2000 series the headers took 0.25 s, all of it before
    the first slice was decoded."""

    def __init__(self, paths: Sequence[str], processes: int, nice: int = 0) -> None:
        self.paths = [str(p) for p in paths]
        self._stop = threading.Event()
        self._out: list[np.ndarray] | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(processes, nice), name="ainode-decode", daemon=True)
        self._thread.start()

    def _run(self, processes: int, nice: int) -> None:
        try:
            self._out = decode_files(self.paths, processes, self._stop, nice)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by result()
            self._out = exc

    def result(self) -> dict[str, np.ndarray]:
        """Each file's stored pixel values by its path; raises what decode_files raised."""
        self._thread.join()
        if isinstance(self._out, BaseException):
            raise self._out
        assert self._out is not None
        return dict(zip(self.paths, self._out))

    def cancel(self) -> None:
        """Kill the processes, if still decoding, and wait for the thread: the caller failed, and nothing will
        take the slices. Once result() has returned there is nothing left to stop."""
        self._stop.set()
        self._thread.join()
