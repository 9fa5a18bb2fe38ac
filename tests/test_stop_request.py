"""`ainode serve` stops on SIGTERM whenever it lands (see node/stop_request.py for the hang this guards)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Many SIGTERMs, each at a random moment of a tight wait loop, so some land while the main thread is inside
# the wait's own bookkeeping. With the old handler (threading.Event.set inside Event.wait(0)) this loop hung
# within a few hundred rounds.
STRESS = textwrap.dedent("""
    import os, random, signal, sys, threading, time
    from node.stop_request import StopRequest

    rounds = int(sys.argv[1])
    for _ in range(rounds):
        stop = StopRequest()
        stop.install()

        def kill() -> None:
            time.sleep(random.random() * 0.001)
            os.kill(os.getpid(), signal.SIGTERM)

        t = threading.Thread(target=kill)
        t.start()
        assert stop.wait(0) == signal.SIGTERM
        t.join()
    print("stopped", rounds)
""")


def test_every_sigterm_stops_the_wait_whenever_it_lands() -> None:
    done = subprocess.run([sys.executable, "-c", STRESS, "2000"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["stopped", "2000"]


def test_sigint_is_returned_as_sigint() -> None:
    code = ("import os, signal; from node.stop_request import StopRequest; s = StopRequest(); s.install(); "
            "os.kill(os.getpid(), signal.SIGINT); print(s.wait(0.01) == signal.SIGINT)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "True", done.stderr
