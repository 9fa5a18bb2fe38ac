"""A data set received straight into its spool temp file once it is past node.receive_to_disk_mb.

Below that size a data set is gathered in memory and written with one durable call (Spool.finish_temp), the
fastest way for the CT and MR slices that make up most traffic. A multi-frame instance (breast
tomosynthesis, whole-slide images, enhanced CT: hundreds of MB to GBs) held in memory would take that much
of the receiving process for each association sending one. Here the File Meta Information is written first
and every fragment after it as it arrives, into the page cache (no sync per fragment); the receiver checks
the header over a read-only mapping of the file, syncs it once and renames it into place, as pynetdicom's
chunked mode does (STORE_RECV_CHUNKED_DATASET) but into the spool, so the file need not be copied again.
"""

from __future__ import annotations

import mmap
import os
import weakref
from pathlib import Path
from typing import Callable

RESERVE_STEP = 16 * 2**20  # bytes a spill file asks the disk for at a time (SpillFile.reserve)


def _discard(fd: int, path: Path) -> None:
    """Close and delete a spill file nobody took (the association aborted mid-data-set, a refusal)."""
    try:
        os.close(fd)
    except OSError:
        pass
    path.unlink(missing_ok=True)


class SpillFile:
    """A temp file opened for a received data set: `prefix` (preamble and File Meta Information) written,
    the data set appended by `write`. Deleted when closed without `sync` and a rename by the caller, or when
    the object is dropped (an association aborted mid-data-set)."""

    def __init__(self, path: Path, fd: int, prefix: bytes, reserve: Callable[[int], None] | None = None) -> None:
        """`reserve(n)` is told of every RESERVE_STEP bytes before they are written, and raises OSError to
        stop the write where the disk has no room for them (storage.min_free_mb)."""
        self.path, self.fd, self.prefix_length = path, fd, len(prefix)
        self._map: mmap.mmap | None = None
        self._discard = weakref.finalize(self, _discard, fd, path)
        self._reserve, self._reserved = reserve, 0
        try:
            self.write(prefix)
        except BaseException:
            self.close()
            raise

    def write(self, data: bytes | memoryview) -> None:
        """Append `data`. Raises OSError (a full disk: ENOSPC; `reserve`'s refusal)."""
        view = memoryview(data)
        if self._reserve is not None and len(view) > self._reserved:
            step = max(RESERVE_STEP, len(view) - self._reserved)
            self._reserve(step)
            self._reserved += step
        self._reserved -= len(view)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def data_set(self) -> memoryview:
        """The data set as received (after the prefix), mapped read-only: nothing is read into memory until
        used, and the pages read are the page cache's, not the process's own."""
        size = os.fstat(self.fd).st_size
        if self._map is None:
            self._map = mmap.mmap(self.fd, size, access=mmap.ACCESS_READ)
        return memoryview(self._map)[self.prefix_length:]

    def sync(self) -> Path:
        """Make the file's data durable (fdatasync) and close it; the caller then renames it into place
        (Spool.publish). Raises OSError; the file is then deleted."""
        try:
            os.fdatasync(self.fd)
        except BaseException:
            self.close()
            raise
        self._discard.detach()
        os.close(self.fd)
        return self.path

    def close(self) -> None:
        """Unmap, and close and delete the file unless `sync` has handed it on. Views of `data_set` still
        alive keep the mapping until they go."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a view is still exported: unmapped when the last one goes
                pass
            self._map = None
        self._discard()
