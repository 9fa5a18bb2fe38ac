"""NodeMetrics from audit records (pure logic; tests/test_api.py scrapes a real node)."""

from node.metrics import NodeMetrics


def test_job_end_and_dispatch_records_update_metrics():
    m = NodeMetrics(lambda: {"queued": {"stat": 2, "routine": 5}, "running": 1})
    m.on_record({"event": "job-end", "outcome": "success", "plugin": "ct_nodule",
                 "timings": {"load_s": 0.4, "plugin_s": 1.5, "total_s": 2.5, "gpu_memory_peak_mb": 812.5,
                             "prefetched": 1}})
    m.on_record({"event": "job-end", "outcome": "failure", "plugin": "ct_nodule", "error": "x"})
    m.on_record({"event": "send-failed", "outcome": "failure", "destination": "pacs", "final": True})
    m.on_record({"event": "report-sent", "destination": "ris"})
    m.on_record({"event": "association-rejected", "outcome": "failure"})
    m.on_record({"event": "study-complete", "outcome": "failure", "study_uid": "1.2"})  # a refused force: not counted
    text = m.render().decode()
    for line in ['ainode_gpu_memory_peak_mb{plugin="ct_nodule"} 812.5',
                 'ainode_job_stage_seconds_count{plugin="ct_nodule",stage="plugin"} 1.0',
                 'ainode_job_stage_seconds_bucket{le="2.0",plugin="ct_nodule",stage="plugin"} 1.0',
                 'ainode_jobs_ended_total{outcome="failure",plugin="ct_nodule"} 1.0',
                 'ainode_dispatch_failures_total{destination="pacs",final="true"} 1.0',
                 'ainode_dispatch_success_total{destination="ris"} 1.0',
                 'ainode_associations_total{outcome="rejected"} 1.0',
                 'ainode_queue_depth{priority="routine"} 5.0', "ainode_jobs_running 1.0"]:
        assert line in text, line
    assert "ainode_studies_completed_total{" not in text
    assert 'stage="prefetched"' not in text


def _at(seconds: float) -> str:
    return f"2026-12-05T10:00:{seconds:09.6f}+00:00"


def test_result_latency_is_timed_from_the_last_image_and_from_completion():
    m = NodeMetrics(lambda: {"queued": {}, "running": 0})
    for t in (1.0, 2.5):
        m.on_record({"event": "instance-stored", "study_uid": "1.1", "calling_ae": "CT1", "ts": _at(t)})
    m.on_record({"event": "study-complete", "outcome": "success", "study_uid": "1.1", "reason": "counts-matched",
                 "ts": _at(4.0)})
    m.on_record({"event": "object-sent", "study_uid": "1.1", "destination": "pacs", "kind": "SEG", "ts": _at(6.0)})
    m.on_record({"event": "report-sent", "study_uid": "1.1", "destination": "ris", "kind": "hl7", "ts": _at(7.0)})
    m.on_record({"event": "object-sent", "study_uid": "9.9", "destination": "pacs", "kind": "SR", "ts": _at(8.0)})
    m.on_record({"event": "instance-stored", "study_uid": "1.1", "calling_ae": "CT1", "ts": _at(12.0)})  # late
    m.on_record({"event": "object-sent", "study_uid": "1.1", "destination": "pacs", "kind": "SR", "ts": _at(9.0)})
    get = m.registry.get_sample_value
    name = "ainode_result_latency_seconds"
    assert get(f"{name}_sum", {"since": "last_image", "destination": "pacs", "kind": "SEG"}) == 3.5
    assert get(f"{name}_sum", {"since": "complete", "destination": "pacs", "kind": "SEG"}) == 2.0
    assert get(f"{name}_sum", {"since": "complete", "destination": "ris", "kind": "hl7"}) == 3.0
    assert get(f"{name}_bucket", {"since": "complete", "destination": "ris", "kind": "hl7", "le": "5.0"}) == 1
    # the SR is timed from completion; its study's latest image came after it: not timed from that
    assert get(f"{name}_sum", {"since": "complete", "destination": "pacs", "kind": "SR"}) == 5.0
    assert get(f"{name}_count", {"since": "last_image", "destination": "pacs", "kind": "SR"}) is None


def test_result_latency_forgets_the_oldest_studies(monkeypatch):
    import node.metrics

    monkeypatch.setattr(node.metrics, "STUDIES_REMEMBERED", 2)
    m = NodeMetrics(lambda: {"queued": {}, "running": 0})
    for i, study in enumerate(("1.1", "1.2", "1.3")):
        m.on_record({"event": "study-complete", "outcome": "success", "study_uid": study, "ts": _at(float(i))})
    for study in ("1.1", "1.2", "1.3"):
        m.on_record({"event": "object-sent", "study_uid": study, "destination": "pacs", "kind": "SEG", "ts": _at(10.0)})
    assert m.registry.get_sample_value("ainode_result_latency_seconds_count",
                                       {"since": "complete", "destination": "pacs", "kind": "SEG"}) == 2
    assert m.registry.get_sample_value("ainode_result_latency_seconds_sum",
                                       {"since": "complete", "destination": "pacs", "kind": "SEG"}) == 9.0 + 8.0
