"""Durable file writes into the spool: temp file written synchronously (O_DSYNC, else fsync), rename,
fsync the directory.

After `write_durable` returns, the file survives a power cut; before it
returns, only a `.part` file in the temp folder can exist, which the start-up
reaper removes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import threading
import time
from pathlib import Path

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_O_DSYNC = getattr(os, "O_DSYNC", 0)  # 0 where the platform has none: finish_temp fsyncs instead
KNOWN_DIRS_MAX = 4096  # folders remembered as existing (Spool._ensure_dir); then forgotten and looked at again
FREE_SPACE_MAX_AGE_S = 1.0  # Spool.free_bytes asks the disk again after this long


class BadUID(ValueError):
    pass


def check_uid(value: object, tag: str) -> str:
    """A UID that is safe to use as a file name; anything else is refused, never sanitised."""
    text = str(value or "").strip().rstrip("\x00")
    if not text:
        raise BadUID(f"{tag} is missing")
    if len(text) > 64 or not UID_RE.match(text):
        raise BadUID(f"{tag} is not a valid UID ({len(text)} characters, digits and dots only)")
    return text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_files(paths: list[str], root: Path) -> int:
    """Delete files and the folders under `root` they leave empty. Returns how many files were deleted."""
    n = 0
    dirs = set()
    for p in map(Path, paths):
        try:
            p.unlink()
            n += 1
        except FileNotFoundError:
            pass
        dirs.add(p.parent)
    for d in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        for folder in (d, d.parent):
            if root in folder.parents:
                try:
                    folder.rmdir()
                except OSError:
                    pass  # not empty, or already gone
    return n


def scratch_prefix(job_id: int | str) -> str:
    """Name prefix of a job's scratch folder (StudyInput.scratch_dir) in the spool's temp folder.

    Not in /tmp: a plugin may write image data there, and a job process killed mid-run (timeout, crash)
    leaves its folder behind; in the spool the node deletes it (remove_scratch, remove_partials)."""
    return f"job{job_id}-scratch-"


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = set()
        self._dir_lock = threading.Lock()
        self._free = 0  # bytes free on the spool's disk when last asked (free_bytes)
        self._free_at = float("-inf")
        self._taken = 0  # bytes free_bytes was told about since

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """A new file name for each receipt, so a copy of an instance received again after its study was
        purged can never be deleted by the purge of the earlier copy."""
        # random, not uuid4: no system call (os.urandom) per instance; `random` reseeds in a forked child
        return self.root / study_uid / series_uid / f"{sop_uid}.{random.getrandbits(32):08x}.dcm"

    def instance_files(self) -> list[Path]:
        """Every instance file in the spool (not temp files)."""
        return [p for p in self.root.glob("*/*/*.dcm") if not p.parts[-3].startswith(".")]

    def remove(self, paths: list[str]) -> int:
        """Delete spool files and the folders they leave empty."""
        n = remove_files(paths, self.root)
        with self._dir_lock:
            self._known_dirs = {d for d in list(self._known_dirs) if d.exists()}
        return n

    def free_bytes(self, size: int, keep: int = 0) -> int:
        """Bytes free on the spool's disk before a file of `size` bytes is written (which the caller then
        writes), for the caller to keep `keep` bytes free (storage.min_free_mb).

        The disk is asked (statvfs, a system call per instance otherwise) at most once a
        FREE_SPACE_MAX_AGE_S; in between, the sizes announced here since are taken off its last answer. A
        figure from that cache that would leave less than `keep` is not used: the disk is asked again, so
        a refusal always rests on a fresh answer. Other processes' writes show at the next look."""
        now = time.monotonic()
        if now - self._free_at < FREE_SPACE_MAX_AGE_S:
            free = self._free - self._taken
            if free - size >= keep:
                self._taken += size
                return free
        self._free, self._free_at, self._taken = shutil.disk_usage(self.root).free, now, size
        return self._free

    def _ensure_dir(self, path: Path) -> None:
        """Create `path` and make its entry durable in each new parent."""
        if path in self._known_dirs:
            return
        with self._dir_lock:
            if len(self._known_dirs) >= KNOWN_DIRS_MAX:
                self._known_dirs.clear()
            missing = []
            p = path
            while not p.exists() and p != self.root:
                missing.append(p)
                p = p.parent
            path.mkdir(parents=True, exist_ok=True)
            for d in reversed(missing):
                _fsync_dir(d.parent)
            self._known_dirs.add(path)

    def temp_path(self) -> Path:
        """A fresh temp file name; `remove_partials` deletes it if a crash leaves it behind."""
        return self.tmp / f"{random.getrandbits(128):032x}.part"  # opened O_EXCL: a clash is an error, never a mix

    def write_durable(self, dest: Path, data: bytes) -> int:
        """Write `data` to `dest` so it is on disk when this returns. Raises OSError on failure."""
        self.publish(self.write_temp(data), dest)
        return len(data)

    def write_temp(self, data: bytes) -> Path:
        """Write `data` to a new temp file, durably; `publish` moves it into place, or the caller deletes
        it. Raises OSError on failure."""
        return self.finish_temp(*self.open_temp(), data)

    def open_temp(self) -> tuple[Path, int]:
        """A new temp file, open for a durable write (`finish_temp`). Raises OSError."""
        tmp = self.temp_path()
        return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_DSYNC, 0o640)

    def open_spill(self) -> tuple[Path, int]:
        """A new temp file for a data set written as it arrives (node/receive/spill.py): readable, to be
        mapped, and not synced at each write; SpillFile.sync makes it durable. Raises OSError."""
        tmp = self.temp_path()
        return tmp, os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)

    def finish_temp(self, tmp: Path, fd: int, *chunks: bytes) -> Path:
        """Write `chunks`, one after the other, to the file `open_temp` gave and close it; on disk when this
        returns.

        The file is opened O_DSYNC, so one writev() call carries the data to disk and its size and
        blocks with it (what fdatasync makes durable; the rename and its folder fsync in `publish` do
        the rest). That call holds no GIL from start to end: the receiver checks the data set's header
        on another thread meanwhile. A separate fsync() would need the GIL again between the two calls,
        and get it only once the header check let go. The chunks (a file meta group and the data set
        as received) are not joined first: that would copy the data set under the GIL. Raises OSError
        (the file is then removed)."""
        try:
            views = [memoryview(c) for c in chunks if len(c)]
            while views:
                n = os.writev(fd, views)
                while views and n >= len(views[0]):  # a short write (a signal, a full disk) goes on from there
                    n -= len(views[0])
                    views.pop(0)
                if views and n:
                    views[0] = views[0][n:]
            if not _O_DSYNC:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def commit(self, tmp: Path, dest: Path) -> None:
        """Make a temp file written by someone else (e.g. pydicom) durable under `dest`."""
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.publish(tmp, dest)

    def publish(self, tmp: Path, dest: Path) -> None:
        """Rename a synced temp file into place and make the rename durable."""
        try:
            self._ensure_dir(dest.parent)
            try:
                os.rename(tmp, dest)
            except FileNotFoundError:
                if not tmp.exists():
                    raise
                # The folder was removed since it was made (another process's purge: a receive process and
                # the node process each have a Spool): made again.
                with self._dir_lock:
                    self._known_dirs.discard(dest.parent)
                self._ensure_dir(dest.parent)
                os.rename(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(dest.parent)

    def remove_scratch(self, job_id: int) -> int:
        """Delete the scratch folder a job's killed process left behind (scratch_prefix)."""
        return self._remove_dirs(f"{scratch_prefix(job_id)}*")

    def _remove_dirs(self, pattern: str) -> int:
        n = 0
        for d in self.tmp.glob(pattern):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
        return n

    def remove_partials(self) -> int:
        """Delete temp files of writes that never completed (a crash mid-receive) and the scratch folders
        of jobs that were running then."""
        n = 0
        for p in self.tmp.glob("*.part"):
            p.unlink(missing_ok=True)
            n += 1
        return n + self._remove_dirs(f"{scratch_prefix('*')}*")
