"""run.executor: ray — jobs run as warm Ray actors on a real local Ray cluster, with the same results as local.

One cluster (`ray start --head` on loopback, one CPU: one worker process) serves the module.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
import pydicom
import pytest

from node.synth import write_chest_ct
from tests.support.orthanc import OrthancServer
from tests.support.pipeline import events, query, send
from tests.support.ray_cluster import RayCluster
from tests.support.wait import wait_until

STUDIES = 10


@pytest.fixture(scope="module")
def ray_cluster():
    with RayCluster(num_cpus=1) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    return [write_chest_ct(root / f"s{i}", slices=24, slice_thickness=10.0, rows=128, cols=128, pixel_spacing=2.8,
                           seed=i, patient_id=f"RAY{i:04d}") for i in range(STUDIES)]


def lung_config(orthanc, **run) -> dict:
    return {
        "assemble": {"quiet_period_s": 1.0, "poll_interval_s": 0.2},
        "run": run,
        "destinations": {"pacs": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port,
                                  "timeout_s": 10, "backoff_initial_s": 0.5}},
        "rules": [{"name": "lung", "series": {"modality": "CT"}, "plugin": "ct_lung", "destinations": ["pacs"]}],
    }


def ray_run(cluster: RayCluster, **extra) -> dict:
    return {"executor": "ray", "ray": {"address": cluster.address, "namespace": "test"}, **extra}


def burst(node, studies) -> None:
    """Send every study, then wait until each one's job is dispatched."""
    for s in studies:
        send(node, s.files)
    wait_until(lambda: query(node, "select count(*) from jobs where state = 'dispatched'")[0][0] == len(studies),
               120, f"{len(studies)} jobs dispatched")


def results(orthanc, studies) -> dict:
    """{study UID: {modality: (SOP Instance UIDs, SR measurement values)}} as the PACS holds them."""
    out = {}
    for s in studies:
        study = orthanc.find_study(s.study_uid)
        got = {}
        for series in orthanc.series_of_study(study):
            mod = series["MainDicomTags"].get("Modality")
            if mod not in ("SEG", "SR"):
                continue
            for inst in orthanc.instances_of_series(series["ID"]):
                ds = pydicom.dcmread(io.BytesIO(orthanc.get_instance_file(inst["ID"])))
                got[mod] = (ds.SOPInstanceUID, measurements(ds) if mod == "SR" else None)
        out[s.study_uid] = got
    return out


def measurements(sr) -> list[tuple[str, str]]:
    """Every numeric content item of the SR: (concept, value) in document order."""
    found = []

    def walk(items):
        for item in items:
            if item.ValueType == "NUM":
                found.append((item.ConceptNameCodeSequence[0].CodeMeaning,
                              str(item.MeasuredValueSequence[0].NumericValue)))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def test_burst_of_ten_studies_through_ray_matches_the_local_executor(tmp_path, ray_cluster, studies, node_factory):
    with OrthancServer(tmp_path / "orthanc-local", aet="ORTHANC") as local_pacs, \
            OrthancServer(tmp_path / "orthanc-ray", aet="ORTHANC") as ray_pacs:
        local = node_factory(lung_config(local_pacs), name="local")
        node = node_factory(lung_config(ray_pacs, **ray_run(ray_cluster)), name="ray")
        with ThreadPoolExecutor(2) as pool:  # both bursts at once: the test's wall time
            for f in [pool.submit(burst, local, studies), pool.submit(burst, node, studies)]:
                f.result()
        assert local.stop() == 0

        expected, got = results(local_pacs, studies), results(ray_pacs, studies)
        assert all(set(r) == {"SEG", "SR"} for r in got.values()), got
        assert all(r["SR"][1] for r in got.values())  # the SRs hold measurements
        assert got == expected

        # The same audit trail and per-job metrics as a local run, plus Ray's own timings.
        starts = events(node, "job-start")
        assert len(starts) == STUDIES and all(e["worker"].startswith("ray:ainode-worker-0@") for e in starts)
        ends = [e for e in events(node, "job-end") if e["outcome"] == "success"]
        assert len(ends) == STUDIES
        for e in ends:
            assert {"load_s", "plugin_s", "build_s", "ray_send_s", "ray_queue_s", "ray_overhead_s",
                    "total_s"} <= set(e["timings"]), e["timings"]
        assert [r["executor"] for r in events(node, "node-start")] == ["ray"]
        assert node.cli("audit", "verify", "--config", str(node.config_path)).returncode == 0
        assert node.stop() == 0


def test_a_job_whose_actor_dies_hangs_or_hogs_memory_fails_alone_and_the_next_job_runs(tmp_path, ray_cluster, studies,
                                                                          node_factory, test_plugins):
    plugins = {"crash": {"entry": "tests.plugins.misbehaving:CrashPlugin"},
               "hang": {"entry": "tests.plugins.misbehaving:HangPlugin"},
               "hog": {"entry": "tests.plugins.misbehaving:HogPlugin"}, "ct_lung": {}}
    rules = [{"name": "crash", "study": {"calling_ae": "CRASH"}, "plugin": "crash"},
             {"name": "hang", "study": {"calling_ae": "HANG"}, "plugin": "hang"},
             {"name": "hog", "study": {"calling_ae": "HOG"}, "plugin": "hog"},
             {"name": "lung", "study": {"calling_ae": "GOOD"}, "plugin": "ct_lung"}]
    # Series by shared path this time: the actors read the node's spool (storage.root is under tmp_path).
    # 8 s: the good ct_lung job (read, segment, SEG/SR build and dciodvfy) must fit in it on a loaded CI machine
    run = ray_run(ray_cluster, max_attempts=1, timeout_s=8, memory_limit_mb=700)
    run["ray"].update(data="shared_path", shared_path=str(tmp_path))
    node = node_factory({"run": run, "plugins": plugins, "rules": rules})

    def ended(plugin):  # type: ignore[no-untyped-def]
        return wait_until(lambda: [e for e in events(node, "job-end") if e["plugin"] == plugin], 90,
                          f"{plugin} job end")[0]

    send(node, studies[0].files, calling="CRASH")
    crashed = ended("crash")
    assert crashed["outcome"] == "failure" and "Ray actor died" in crashed["error"], crashed
    send(node, studies[1].files, calling="HANG")
    hung = ended("hang")
    assert hung["outcome"] == "failure" and "timed out after 8 s (run.timeout_s)" in hung["error"], hung
    send(node, studies[2].files, calling="HOG")
    hog = ended("hog")
    assert hog["outcome"] == "failure" and "over run.memory_limit_mb (700 MB)" in hog["error"], hog
    send(node, studies[3].files, calling="GOOD")
    ok = ended("ct_lung")
    assert ok["outcome"] == "success" and ok["outputs"], ok
    assert "ray_input_mb" not in ok["timings"] and "ray_queue_s" in ok["timings"]  # nothing shipped
    workers = [e["worker"] for e in events(node, "job-start")]
    assert len(workers) == 4 and all(w.startswith("ray:") for w in workers)
    assert node.proc.poll() is None
    assert node.stop() == 0


def test_executor_ray_without_a_cluster_section_is_a_config_error(tmp_path, node_factory):
    node = node_factory({"run": {"executor": "ray"}}, start=False)
    r = node.cli("check-config", str(node.config_path))
    assert r.returncode != 0 and "run.executor is ray: add run.ray" in r.stderr, r.stderr


def test_unreachable_ray_cluster_refuses_to_start(tmp_path, node_factory):
    from tests.support.net import free_port

    node = node_factory({"run": {"executor": "ray", "ray": {"address": f"127.0.0.1:{free_port()}",
                                                                "connect_timeout_s": 1}}}, start=False)
    with pytest.raises(RuntimeError, match="cannot join the Ray cluster at run.ray.address"):
        node.start(timeout=60)
    assert node.proc.returncode == 2


def test_ray_section_errors_name_their_keys():
    from pydantic import ValidationError

    from node.config.schema import NodeConfig

    cases = [({"executor": "local", "ray": {"address": "h:1"}}, "run.ray is set but run.executor is local"),
             ({"executor": "ray", "ray": {"address": "h:1", "data": "shared_path"}}, "needs run.ray.shared_path"),
             ({"executor": "ray", "ray": {"address": "h:1", "data": "shared_path", "shared_path": "rel"}},
              "run.ray.shared_path must be an absolute path"),
             ({"executor": "ray", "ray": {"address": "h:1", "num_gpu": 1}}, "num_gpu")]
    for run, message in cases:
        with pytest.raises(ValidationError, match=message):
            NodeConfig.model_validate({"run": run})
    ok = NodeConfig.model_validate({"run": {"executor": "ray", "ray": {"address": "10.0.0.5:6379"}}}).run.ray
    assert (ok.data, ok.num_cpus, ok.namespace) == ("object_store", 1.0, "ainode")


def test_check_config_describes_the_ray_workers(tmp_path, node_factory):
    node = node_factory({"run": {"executor": "ray", "workers": 2, "ray": {"address": "10.0.0.5:6379"}}}, start=False)
    r = node.cli("check-config", str(node.config_path))
    assert r.returncode == 0, r.stderr
    assert "executor: ray at 10.0.0.5:6379" in r.stdout and r.stdout.count("worker ainode-worker-") == 2, r.stdout
