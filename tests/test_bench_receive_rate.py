"""bench/receive_rate.py's durable write timing and its estimate of storescp's rate with that write added
(what the storescp target is weighed against)."""

from __future__ import annotations

import pytest

from bench.receive_rate import with_durable_write, durable_write_s


def test_durable_write_times_each_file_and_leaves_nothing_behind(tmp_path):
    files = []
    for i in range(3):
        f = tmp_path / f"f{i}.dcm"
        f.write_bytes(bytes([i]) * 1000)
        files.append(f)
    folder = tmp_path / "durable"
    taken = durable_write_s(files, folder)
    assert len(taken) == 3 and all(t > 0 for t in taken)
    assert not folder.exists()


def test_the_estimate_adds_the_write_to_each_associations_round_trip():
    assert with_durable_write(1000.0, 1, 0.001) == pytest.approx(500.0)  # 1 ms round trip + 1 ms write
    assert with_durable_write(1000.0, 4, 0.001) == pytest.approx(800.0)  # 4 ms round trip each + 1 ms write


def test_storescp_with_the_fsync_shim_makes_every_received_file_durable(tmp_path):
    """The `storescp-fsync` receiver: DCMTK storescp with bench/fsync_on_close.c preloaded, sent to by DCMTK
    storescu. Every file it stores went through the shim's fsync of the file and of its folder (counted by
    the shim only once both succeeded), and the bench refuses a send the shim did not cover."""
    from bench.receive_rate import StorescpFsync, send
    from node.synth import write_chest_ct

    files = sorted(write_chest_ct(tmp_path / "ct", slices=10, rows=64, cols=64).files)
    with StorescpFsync(tmp_path / "rx") as rx:
        rx.reset()
        send(files, rx.aet, rx.port, 1, tmp_path)
        assert rx.received() == 10
        assert rx.count.stat().st_size == 10
        rx.count.write_bytes(b"+")  # as if the shim had missed nine of them
        with pytest.raises(RuntimeError, match="made 1 of the 10 received files durable"):
            rx.received()


def test_a_send_reports_the_senders_cpu_and_the_idle_share(tmp_path):
    """Each row of the table also says what the storescu processes cost and how much of the machine was
    left idle: on two cores the senders take a large share, which the receivers' ratios alone hide."""
    from bench.receive_rate import Storescp, send_once
    from node.synth import write_chest_ct

    files = sorted(write_chest_ct(tmp_path / "ct", slices=10, rows=64, cols=64).files)
    with Storescp(tmp_path / "rx") as rx:
        sent = send_once(rx, files, 2, tmp_path)
    assert sent.seconds > 0 and sent.cpu_ms is not None
    assert sent.sender_ms > 0  # two storescu processes ran, and were waited for
    assert 0.0 <= sent.idle <= 1.0
