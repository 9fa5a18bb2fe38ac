"""A Ray actor's scratch folder: an actor that ends normally removes its own; a new actor deletes those of
actors that were killed (mid-job, their shipped series still staged there) and leaves live ones' alone.
No Ray needed: the folders are claimed by plain processes, as PluginActor does."""

import subprocess
import sys

from node.run.ray_executor import claim_scratch

HOLD = """
import sys, time
from pathlib import Path
from node.run.ray_executor import claim_scratch
scratch, _ = claim_scratch(Path(sys.argv[1]))
(scratch / "job-7-abc" / "series").mkdir(parents=True)
(scratch / "job-7-abc" / "series" / "00000.dcm").write_bytes(b"image")
print(scratch, flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_new_actor_removes_dead_actors_scratch_and_keeps_live_ones(tmp_path):
    dead = subprocess.run([sys.executable, "-c", HOLD, str(tmp_path), "0"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert not (tmp_path / dead).exists()  # an actor that ends normally removes its own folder
    live = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "60"], stdout=subprocess.PIPE, text=True)
    try:
        live_dir = live.stdout.readline().strip()
        killed = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "60"], stdout=subprocess.PIPE,
                                  text=True)
        killed_dir = killed.stdout.readline().strip()
        killed.kill()  # as run.timeout_s kills an actor mid-job
        killed.wait(10)
        killed.stdout.close()
        unlocked = tmp_path / "ainode-ray-older"  # no lock file: not known to be an actor's; left alone
        unlocked.mkdir()

        mine, _ = claim_scratch(tmp_path)
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {mine.name, tmp_path.joinpath(live_dir).name, unlocked.name}, (left, dead, killed_dir)
        assert (tmp_path / live_dir / "job-7-abc" / "series" / "00000.dcm").exists()
    finally:
        live.kill()
        live.wait(10)
        live.stdout.close()
