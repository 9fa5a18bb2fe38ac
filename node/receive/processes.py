"""More receive processes on node.port (node.receive_processes), so that C-STOREs use every core.

pynetdicom decodes PDUs and our checks parse headers in Python, under one GIL: one process receives on
one core. With node.receive_processes: N the node process keeps its own SCP and starts N-1 receive
processes that accept on its listening socket too, taking turns so that the associations spread evenly
over all N (node/receive/accept_turns.py).
A receive process checks each instance and makes its file durable itself; its store row and audit
record are written by the node process (node/receive/rpc.py), so the durability order (file, row,
audit record, then Success) and the single audit appender are unchanged. The receive processes die with
the node process (PR_SET_PDEATHSIG), like its workers, so a kill -9 drops their associations too.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.config.schema import NodeSection
from node.lifeline import die_with_parent
from node.receive.accept_turns import AcceptTurns
from node.receive.rpc import RpcClient, RpcServer
from node.receive.spool import Spool

log = logging.getLogger("ainode.receive")

RESTART_S = 1.0  # a receive process that died is replaced after this long ...
RESTART_MAX_S = 300.0  # ... doubled up to this while its replacements die within STABLE_S of starting
STABLE_S = 60.0
START_TIMEOUT_S = 60.0  # a replacement not listening by then is killed and counts as dying


def _child(index: int, cfg: NodeSection, tls_base: str | None, spool_root: str, min_free_mb: int,
           rpc_path: str, authkey: bytes, counts: Any, turns: AcceptTurns, control: Any, log_level: str) -> None:
    die_with_parent()
    from node.logs import setup_logging

    setup_logging(log_level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node process decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from node.config.tls import server_context
    from node.receive.scp import StoreSCP

    client = RpcClient(Path(rpc_path), authkey)
    ctx = server_context(cfg.tls, Path(tls_base)) if cfg.tls else None

    def elsewhere() -> int:  # slot 0 is the node process's own SCP
        return sum(v for i, v in enumerate(counts[:]) if i != index)

    node_scp = client.proxy("scp")  # the node process's StoreSCP: commits instances, takes release hints
    scp = StoreSCP(cfg, Spool(Path(spool_root)), client.proxy("store"), client.proxy("audit"),  # type: ignore[arg-type]
                   min_free_mb=min_free_mb, ssl_context=ctx, index=client.proxy("index"),  # type: ignore[arg-type]
                   committer=node_scp,
                   turns=turns, established_elsewhere=elsewhere)

    def released(studies: set[str]) -> None:  # the node process's assembler asks for the counts now
        try:
            node_scp.sender_released(studies)
        except Exception as exc:  # noqa: BLE001 - a hint only: the quiet-period check completes it anyway
            log.warning("release hint not passed on error=%s", type(exc).__name__)

    scp.on_released = released
    scp.start()
    control.send("listening")
    while True:
        if control.poll(0.2):
            try:
                cmd, arg = control.recv()
            except EOFError:  # the node process is gone
                os._exit(0)
            if cmd == "stop_accepting":
                scp.stop_accepting()
                control.send(True)
            elif cmd == "wait":
                control.send(scp.wait_for_associations(arg))
            elif cmd == "stop":
                scp.stop()
                control.send(True)
                return
        counts[index] = len(scp._established())


class ReceiveProcesses:
    """The node process's side: the RPC server and the N-1 extra receive processes."""

    def __init__(self, cfg: NodeSection, listener: socket.socket, turns: AcceptTurns, spool: Spool,
                 targets: dict[str, Any], run_dir: Path, *, tls_base: Path | None, min_free_mb: int) -> None:
        """`listener`: the node process's listening socket; `turns`: the node process's AcceptTurns, one slot
        per receive process (the node process's own included)."""
        self.count = turns.processes
        self.listener, self.turns = listener, turns
        self.cfg = cfg.model_copy(update={"port": listener.getsockname()[1]})
        self.spool, self.tls_base, self.min_free_mb = spool, tls_base, min_free_mb
        authkey = secrets.token_bytes(32)
        self.rpc_path = run_dir / "receive.sock"
        self.server = RpcServer(targets, self.rpc_path, authkey)
        self.authkey = authkey
        ctx = mp.get_context("spawn")
        # lock=False: each slot has one writer at a time, and an int slot is read or written whole; a
        # lock would be a named POSIX semaphore, left in /dev/shm if the node's process group is SIGKILLed.
        self.counts: Any = ctx.Array("i", self.count, lock=False)
        self._procs: list[tuple[Any, Any]] = []
        self._ctx = ctx
        self._stopped = threading.Event()
        self._closing = threading.Event()  # stop_accepting(): no more replacements
        self._dead: set[int] = set()  # indexes of receive processes that exited while the node ran
        self._lock = threading.Lock()  # _procs: replaced by the restarts, read by _ask and stop
        self._level = "INFO"
        self._started_at: dict[int, float] = {}
        self._backoff: dict[int, float] = {}
        self._restart_at: dict[int, float] = {}  # index -> when to start a replacement
        self._starting: dict[int, tuple[Any, Any, float]] = {}  # index -> (process, pipe, started) not yet listening

    def start(self, own_established: Callable[[], int], timeout: float = 60.0) -> None:
        """Start the receive processes; `own_established` counts the node process's own associations."""
        def publish() -> None:
            while not self._stopped.is_set():
                self.counts[0] = own_established()
                try:
                    self._check_alive()
                except Exception:  # noqa: BLE001 - the counts must go on being published
                    log.exception("receive process check failed")
                self._stopped.wait(0.2)

        self._level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        for i in range(1, self.count):
            self._procs.append(self._spawn(i))
        deadline = time.monotonic() + timeout
        for p, conn in self._procs:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"receive process {p.name} did not start listening on port {self.cfg.port} "
                                   f"within {timeout:.0f} s (node.receive_processes)")
            conn.recv()
        self._started_at = {i: time.monotonic() for i in range(1, self.count)}
        threading.Thread(target=publish, name="receive-counts", daemon=True).start()
        log.info("receive processes listening count=%d port=%d", self.count, self.cfg.port)

    def _spawn(self, i: int) -> tuple[Any, Any]:
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(target=_child, name=f"ainode-receive-{i}", daemon=True, args=(
            i, self.cfg, str(self.tls_base) if self.tls_base else None, str(self.spool.root), self.min_free_mb,
            str(self.rpc_path), self.authkey, self.counts, self.turns.for_process(i, self.listener), child,
            self._level))
        p.start()
        child.close()
        return p, parent

    def _check_alive(self) -> None:
        """A receive process that died takes no more turns (the others would wait DEFER_S for it at every
        accept) and holds no associations; the node receives on the processes left, and starts another in
        its place after RESTART_S (doubled, up to RESTART_MAX_S, while replacements die within STABLE_S)."""
        now = time.monotonic()
        for i, (p, _) in enumerate(list(self._procs), start=1):
            if p.exitcode is not None and i not in self._dead and not self._closing.is_set():
                self._dead.add(i)
                self.turns.retire(i)
                self.counts[i] = 0
                lived = now - self._started_at.get(i, now)
                wait = RESTART_S if lived >= STABLE_S else min(self._backoff.get(i, RESTART_S / 2) * 2, RESTART_MAX_S)
                self._backoff[i] = wait
                self._restart_at[i] = now + wait
                log.error("receive process exited, receiving on the others process=%s exitcode=%s port=%d "
                          "restart_in_s=%.0f", p.name, p.exitcode, self.cfg.port, wait)
        for i, at in list(self._restart_at.items()):
            if now >= at and i not in self._starting:
                with self._lock:  # stop_accepting() sets _closing under it: nothing starts after it looked
                    if self._closing.is_set():
                        return
                    del self._restart_at[i]
                    self._starting[i] = (*self._spawn(i), now)
        if self._closing.is_set():
            return
        for i, (p, conn, since) in list(self._starting.items()):
            listening = False
            if conn.poll(0):
                try:
                    listening = conn.recv() == "listening"
                except (EOFError, OSError):
                    pass
            if listening:
                with self._lock:
                    del self._starting[i]
                    self._procs[i - 1] = (p, conn)
                self._started_at[i] = now
                self._dead.discard(i)
                self.turns.reinstate(i)
                log.warning("receive process restarted process=%s pid=%d port=%d", p.name, p.pid, self.cfg.port)
            elif p.exitcode is not None or now - since > START_TIMEOUT_S:  # died or hangs while starting
                if p.exitcode is None:
                    p.kill()
                p.join(5)
                with self._lock:
                    del self._starting[i]
                    self._procs[i - 1] = (p, conn)
                self._started_at[i] = since
                self._dead.discard(i)  # found dead again on the next pass: logged, and replaced later

    def elsewhere(self) -> int:
        """Associations the extra receive processes hold (node.max_associations counts all)."""
        return sum(self.counts[1:])

    def _ask(self, cmd: str, arg: Any = None, timeout: float = 30.0) -> list[Any]:
        answers = []
        with self._lock:
            procs = list(self._procs)
        for p, conn in procs:
            if not p.is_alive():
                continue
            try:
                conn.send((cmd, arg))
                answers.append(conn.recv() if conn.poll(timeout) else None)
            except (OSError, EOFError):
                answers.append(None)
        return answers

    def stop_accepting(self) -> None:
        with self._lock:
            self._closing.set()
            starting = [p for p, _, _ in self._starting.values()]
        for p in starting:  # a replacement not listening yet holds no association: it must not start now
            p.kill()
        self._ask("stop_accepting")

    def wait_for_associations(self, timeout: float) -> bool:
        return all(self._ask("wait", timeout, timeout + 5))

    def stop(self) -> None:
        with self._lock:
            self._closing.set()
            self._stopped.set()
        self._ask("stop")
        with self._lock:
            procs = list(self._procs) + [(p, conn) for p, conn, _ in self._starting.values()]
        for p, conn in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
            conn.close()
        self.server.close()
        try:
            self.rpc_path.parent.rmdir()  # the private folder the socket was made in
        except OSError:
            pass
