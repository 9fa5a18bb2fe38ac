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
