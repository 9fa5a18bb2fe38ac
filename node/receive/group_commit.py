"""Group commit of the receiver's index rows: one transaction for every association waiting.

Each association thread has already made its instance file durable; it may answer Success only once
the instance's store row is committed too. With several associations the commits queue behind the
store's one writer (and on PostgreSQL each costs a WAL flush). Here the first waiting thread becomes the
leader and commits the rows of every thread waiting at that moment; the others wait for that commit and
no thread answers before its own row is committed. With one association a batch holds one row and nothing
waits longer than before (no timer, no extra thread hop). Store.add_instances says why, on SQLite, that
commit does not wait for the WAL fsync.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from node.store import Store
from node.store.db import InstanceMeta

MAX_BATCH = 64


@dataclass(eq=False)
class _Pending:
    meta: InstanceMeta
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    result: bool = False
    error: BaseException | None = None


class GroupCommit:
    def __init__(self, store: Store, max_batch: int = MAX_BATCH) -> None:
        self.store = store
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._busy = False  # a leader is committing
        self.batches = 0  # commits made; rows / batches is the batch size the associations reached
        self.rows = 0

    def add(self, meta: InstanceMeta) -> bool:
        """Index one durable file; True if it is new. Returns only after the row is committed; raises what
        the store raised (the caller must then refuse the instance)."""
        me = _Pending(meta)
        with self._lock:
            self._queue.append(me)
            if not self._busy:
                self._busy = me.lead = True
        if not me.lead:
            me.done.wait()
        if me.lead:  # first in, or handed the lead by the previous leader
            self._commit_batch()
        if me.error is not None:
            raise me.error
        return me.result

    def _commit_batch(self) -> None:
        with self._lock:
            batch = self._queue[:self.max_batch]
            del self._queue[:len(batch)]
        try:
            results = self.store.add_instances([p.meta for p in batch])
            for p, r in zip(batch, results):
                p.result = r
        except BaseException as exc:  # noqa: BLE001 - every waiter of this batch refuses its instance
            for p in batch:
                p.error = exc
        self.batches += 1
        self.rows += len(batch)
        with self._lock:
            nxt = self._queue[0] if self._queue else None
            if nxt is not None:
                nxt.lead = True
            else:
                self._busy = False
        for p in batch:
            p.done.set()
        if nxt is not None:
            nxt.done.set()
