"""Load: 10 concurrent storescu processes, 3,000 instances; every acknowledged instance is stored once."""

import subprocess

from sqlalchemy import func, select

from node.store import Store
from node.store.models import Instance
from node.synth import write_chest_ct


def test_ten_concurrent_senders_3000_instances(tmp_path, node_factory):
    studies = [write_chest_ct(tmp_path / f"ct{i}", slices=300, rows=64, cols=64, pixel_spacing=5.6, seed=i,
                              patient_id=f"LOAD{i:02d}") for i in range(10)]
    node = node_factory({"assemble": {"quiet_period_s": 3600}, "node": {"max_associations": 10}})
    procs = [subprocess.Popen(["storescu", "-v", "-aec", node.ae_title, "127.0.0.1", str(node.port),
                               *map(str, s.files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for s in studies]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 10, [o[-500:] for o in outputs]
    acknowledged = sum(o.count("Received Store Response (Success)") for o in outputs)
    assert acknowledged == 3000

    store = Store(f"sqlite:///{node.var / 'ainode.db'}")
    with store.session() as s:
        held = s.scalar(select(func.count()).select_from(Instance))
        distinct_paths = s.scalar(select(func.count(func.distinct(Instance.path))))
    store.close()
    assert held == acknowledged == distinct_paths
    files = [p for p in (node.var / "spool").rglob("*.dcm")]
    assert len(files) == 3000
    events = [r["event"] for r in node.audit_records()]
    assert events.count("instance-stored") == 3000 and "instance-duplicate" not in events
    assert node.proc.poll() is None
