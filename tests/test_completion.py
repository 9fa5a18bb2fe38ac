"""Study completion: by counts from the sending PACS (C-FIND), else by quiet period, or forced; required series.

The integration tests run a real Orthanc holding the full study and the node as a subprocess; storescu
sends the study to the node as that PACS (calling AE ORTHANC), as a PACS's auto-routing would.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.assemble import Assembler
from node.assemble.find import ExpectedCounts, QueryError
from node.audit import AuditLog
from node.config.schema import NodeConfig, Rule, Source
from node.route import SeriesFacts, StudyFacts, evaluate_all
from node.store import InstanceMeta, Store
from node.synth import write_chest_ct
from tests.support.net import free_port
from tests.support.pipeline import events, held_association, query, send, status
from tests.support.wait import wait_until

HANG = {"entry": "tests.plugins.misbehaving:HangPlugin", "options": {"seconds": 0}}


def small_ct(tmp_path: Path, name: str = "ct", **kw):
    """12 slices of 64×64: enough for counting, fast to write, send and index."""
    args = {"slices": 12, "rows": 64, "cols": 64, "pixel_spacing": 5.6, "seed": 1, **kw}
    return write_chest_ct(tmp_path / name, **args)


def node_config(pacs_port: int | None, quiet: float = 60.0, rules: list | None = None, **assemble) -> dict:
    cfg = {"assemble": {"quiet_period_s": quiet, **assemble},
           "plugins": {"hang": HANG},
           "rules": rules or [{"name": "ct", "series": {"modality": "CT"}, "plugin": "hang"}]}
    if pacs_port is not None:
        cfg["sources"] = {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port, "timeout_s": 3}}
    return cfg


def completion(node, study_uid: str, revision: int = 0) -> dict:
    """The study-complete audit record of `revision`, once there is one."""
    def find():
        return next((r for r in events(node, "study-complete")
                     if r["study_uid"] == study_uid and r.get("revision") == revision), None)
    return wait_until(find, 20, f"study-complete of revision {revision}", interval=0.05)


def latency(node, study_uid: str) -> float:
    """Seconds from the last instance stored to the completion, from the node's store."""
    [(done, last)] = query(node, "SELECT completed_at, last_received_at FROM studies WHERE study_uid = ?",
                           study_uid)
    return done - last


@pytest.fixture
def pacs_with_study(tmp_path, orthanc, node_factory, test_plugins):
    """(orthanc, node, ct): Orthanc holds the whole study and lets the node query it; the node has 60 s quiet."""
    ct = small_ct(tmp_path)
    orthanc.upload_files(ct.files)
    node = node_factory(node_config(orthanc.dicom_port))
    orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", node.port)  # the PACS must know its querier
    return orthanc, node, ct


# ---- integration: real Orthanc, node subprocess ------------------------------------------------------


def test_complete_by_counts_within_one_second_with_quiet_period_60s(pacs_with_study):
    _, node, ct = pacs_with_study
    send(node, ct.files, calling="ORTHANC")
    rec = completion(node, ct.study_uid)
    took = latency(node, ct.study_uid)
    print(f"completion by counts {took:.3f}s after the last instance")
    assert rec["reason"] == "counts-matched" and rec["source"] == "pacs"
    assert rec["instances"] == rec["expected_instances"] == 12 and rec["expected_series"] == 1
    assert 0 < took < 1.0
    out = status(node)
    assert "(counts-matched)" in out
    wait_until(lambda: events(node, "rule-matched"), 10, "the study to be routed")


def test_the_pacs_is_asked_as_soon_as_it_releases_the_association(tmp_path, orthanc, node_factory, test_plugins):
    ct = small_ct(tmp_path)
    orthanc.upload_files(ct.files)
    node = node_factory(node_config(orthanc.dicom_port, evidence_check_s=30))  # no quiet gap would do it
    orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", node.port)
    send(node, ct.files, calling="ORTHANC")  # storescu releases its association when it is done
    rec = completion(node, ct.study_uid)
    assert rec["reason"] == "counts-matched" and rec["instances"] == 12
    assert latency(node, ct.study_uid) < 5.0


def test_a_receive_process_passes_the_release_on(tmp_path, orthanc, node_factory, test_plugins):
    """node.receive_processes 2: a study whose association a receive process (not the node process) took
    completes at its release too. An idle node takes one association itself; while it holds another, the
    next goes to the receive process (node/receive/accept_turns.py)."""
    cfg = node_config(orthanc.dicom_port, evidence_check_s=30)
    cfg["node"] = {"receive_processes": 2}
    node = node_factory(cfg)
    orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", node.port)
    wait_until(lambda: "receive processes listening" in node.log_path.read_text(), 60, "receive processes")
    ct = small_ct(tmp_path)
    orthanc.upload_files(ct.files)
    with held_association(node):
        send(node, ct.files, calling="ORTHANC")  # one association
    takers = {r["calling_ae"]: r["receiver_pid"] for r in events(node, "association-accepted")}
    assert takers["HOLDER"] == node.proc.pid and takers["ORTHANC"] != node.proc.pid
    rec = completion(node, ct.study_uid)
    assert rec["reason"] == "counts-matched" and rec["instances"] == 12
    assert latency(node, ct.study_uid) < 5.0


def test_partial_send_waits_then_the_rest_completes_by_counts(pacs_with_study):
    _, node, ct = pacs_with_study
    send(node, ct.files[:8], calling="ORTHANC")
    time.sleep(2.5)  # the PACS has been asked (after 0.4 s quiet) and said 12
    assert not events(node, "study-complete")
    assert query(node, "SELECT state FROM studies") == [("receiving",)]
    send(node, ct.files[8:], calling="ORTHANC")  # within the 5 s min interval: held == last answer asks again
    rec = completion(node, ct.study_uid)
    assert rec["reason"] == "counts-matched" and rec["instances"] == 12
    assert latency(node, ct.study_uid) < 1.0


def test_partial_send_completes_by_quiet_period_saying_what_was_missing(tmp_path, orthanc, node_factory,
                                                                        test_plugins):
    ct = small_ct(tmp_path)
    direct = small_ct(tmp_path, "direct", seed=5)  # from a modality: no source to ask
    orthanc.upload_files([*ct.files, *direct.files])
    node = node_factory(node_config(orthanc.dicom_port, quiet=3.0))
    orthanc.add_modality("ainode", node.ae_title, "127.0.0.1", node.port)
    send(node, ct.files[:8], calling="ORTHANC")
    send(node, direct.files, calling="MODALITY1")
    rec = completion(node, ct.study_uid)
    assert rec["reason"] == "quiet-period" and rec["instances"] == 8
    assert rec["evidence"] == "held 8 of 12 instances"
    assert latency(node, ct.study_uid) >= 3.0
    rec = completion(node, direct.study_uid)
    assert rec["reason"] == "quiet-period" and "evidence" not in rec
    assert status(node).count("(quiet-period)") == 2
    assert "no completion evidence" not in node.log_path.read_text()


def test_pacs_down_falls_back_to_quiet_period_and_logs_once(tmp_path, node_factory, test_plugins):
    ct = small_ct(tmp_path)
    down = free_port()  # nothing listens: the PACS is down
    node = node_factory(node_config(down, quiet=3.0, evidence_min_interval_s=1.0))
    send(node, ct.files[:6], calling="ORTHANC")
    time.sleep(1.8)  # asked after 0.4 s quiet: refused
    send(node, ct.files[6:], calling="ORTHANC")  # a second burst after the min interval: asked again, no new log
    rec = completion(node, ct.study_uid)
    assert rec["reason"] == "quiet-period" and rec["instances"] == 12
    assert f"cannot connect to ORTHANC@127.0.0.1:{down}" in rec["evidence"]
    log = node.log_path.read_text()
    assert log.count("no completion evidence") == 1, log
    assert "SYNTH0001" not in log and "Synthetic^Chest" not in log  # no patient ID or name in ordinary logs


def test_required_series_rule(tmp_path, node_factory, test_plugins):
    rule = {"name": "lung-thin", "series": {"modality": "CT"}, "plugin": "hang",
            "requires": [{"series_description": "lung", "slice_thickness": [0, 1.5]}]}
    node = node_factory(node_config(None, quiet=1.0, rules=[rule]))
    thick = small_ct(tmp_path, "thick", slice_thickness=5.0, series_description="Body 5.0 B30f")
    send(node, thick.files)
    rec = wait_until(lambda: events(node, "no-rule-matched"), 20, "the thick-only study to be routed")[0]
    assert rec["study_uid"] == thick.study_uid
    assert rec["not_matched"] == {"lung-thin": "requires.0: no series with series_description ~ 'lung', "
                                                "slice_thickness in [0, 1.5]"}
    thin = small_ct(tmp_path, "thin", slice_thickness=1.0, series_description="Lung 1.0 B70f", seed=2,
                    study_uid="1.2.826.0.1.3680043.8.498.77")
    other = small_ct(tmp_path, "other", slice_thickness=5.0, series_description="Body 5.0 B30f", seed=2,
                     study_uid="1.2.826.0.1.3680043.8.498.77")
    send(node, [*other.files, *thin.files])
    matched = wait_until(lambda: events(node, "rule-matched"), 20, "the study with a thin lung series to match")
    assert matched[0]["study_uid"] == thin.study_uid and matched[0]["rule"] == "lung-thin"
    assert matched[0]["series_uid"] == thin.series_uid  # largest then thinnest of the `series` matches


def test_forced_completion_request(tmp_path, node_factory, test_plugins):
    ct = small_ct(tmp_path)
    node = node_factory(node_config(None, quiet=60.0))
    send(node, ct.files)
    r = node.cli("complete", "--config", str(node.config_path), "--study", ct.study_uid)
    assert r.returncode == 0 and "complete (forced)" in r.stdout, r.stderr
    rec = completion(node, ct.study_uid)
    assert rec["reason"] == "forced" and "@" in rec["requested_by"]  # user@host of whoever asked
    again = node.cli("complete", "--config", str(node.config_path), "--study", ct.study_uid)
    assert again.returncode == 1 and "not completed: study is" in again.stderr
    assert "(forced)" in status(node)


# ---- units: when the PACS is asked, rules, config ------------------------------------------------------


class Inline:
    """Runs the checker's C-FINDs at once, so a unit test sees their effect on return."""

    def submit(self, fn, *args):
        fn(*args)

    def shutdown(self, **_kw):
        pass


class FakePacs:
    def __init__(self, counts: dict[str, int] | None = None, error: QueryError | None = None):
        self.counts, self.error, self.asked = counts or {}, error, []

    def __call__(self, src, calling_ae, study_uid, ask_series):
        self.asked.append(study_uid)
        if self.error:
            raise self.error
        total = sum(self.counts.values())
        return ExpectedCounts(total, dict(self.counts) if ask_series(total) else None)


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_assembler(tmp_path, pacs: FakePacs, clock: Clock, quiet: float = 60.0):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    audit = AuditLog(tmp_path / "audit.jsonl")
    src = Source(ae_title="PACS", host="127.0.0.1", port=104)
    asm = Assembler(store, audit, quiet, sources={"pacs": src}, evidence_check_s=0.5, evidence_min_interval_s=5,
                    clock=clock)
    asm.evidence._pool = Inline()
    asm.evidence.query = pacs
    return store, asm


def receive(store, clock, study="1.9", series="1.9.1", n=1, start=0, calling="PACS"):
    for i in range(start, start + n):
        store.add_instance(InstanceMeta(f"{series}.{i}", "1.2.840.10008.5.1.4.1.1.2", series, study,
                                        "1.2.840.10008.1.2.1", f"/x/{series}.{i}", 1, calling), now=clock.t)


def test_asked_only_after_a_quiet_gap_once_per_burst(tmp_path):
    clock, pacs = Clock(), FakePacs({"1.9.1": 10})
    store, asm = make_assembler(tmp_path, pacs, clock)
    for i in range(6):  # a busy receive: an instance every 0.1 s, never quiet for 0.5 s
        receive(store, clock, start=i)
        assert asm.tick() == []
        clock.t += 0.1
    assert pacs.asked == []
    clock.t += 0.5
    asm.tick(), asm.tick(), asm.tick()
    assert pacs.asked == ["1.9"]  # 6 of 10: asked once; nothing new since, so not again
    clock.t += 10
    asm.tick()
    assert pacs.asked == ["1.9"]
    receive(store, clock, n=1, start=6)  # a new burst, 7 of 10: the min interval has passed
    clock.t += 0.6
    asm.tick()
    assert len(pacs.asked) == 2
    receive(store, clock, n=3, start=7)  # 10 of 10, 1 s after the last ask: as many as it said, ask now
    clock.t += 0.6
    assert asm.tick() == [] and asm.tick() == ["1.9"]
    assert len(pacs.asked) == 3
    assert store.get_study("1.9").completion_reason == "counts-matched"


def test_a_sender_releasing_its_association_is_asked_about_at_once(tmp_path):
    clock, pacs = Clock(), FakePacs({"1.9.1": 3})
    store, asm = make_assembler(tmp_path, pacs, clock)
    receive(store, clock, n=3)
    receive(store, clock, study="2.9", series="2.9.1", n=1)  # another study, its sender still sending
    assert asm.tick() == [] and pacs.asked == []  # not quiet for evidence_check_s yet
    asm.sender_done({"1.9"})
    assert asm.tick() == [] and asm.tick() == ["1.9"]  # no time has passed: asked because of the release
    assert pacs.asked == ["1.9"]
    assert store.get_study("1.9").completion_reason == "counts-matched"
    asm.sender_done({"1.9"})  # a late hint for a study already complete asks nothing
    asm.tick()
    assert pacs.asked == ["1.9"]


def test_a_burst_short_of_the_answer_waits_for_the_min_interval(tmp_path):
    clock, pacs = Clock(), FakePacs({"1.9.1": 10})
    store, asm = make_assembler(tmp_path, pacs, clock)
    receive(store, clock, n=3)
    clock.t += 0.6
    asm.tick()
    receive(store, clock, n=3, start=3)
    clock.t += 0.6
    asm.tick()
    assert len(pacs.asked) == 1  # 6 < 10 and only 1.2 s since the last ask
    clock.t += 5
    asm.tick()
    assert len(pacs.asked) == 2


def test_every_pacs_series_must_be_held(tmp_path):
    clock, pacs = Clock(), FakePacs({"1.9.1": 2, "1.9.2": 2})
    store, asm = make_assembler(tmp_path, pacs, clock)
    receive(store, clock, series="1.9.1", n=2)
    receive(store, clock, series="1.9.3", n=2)  # as many instances, but another series (another sender)
    clock.t += 0.6
    asm.tick()
    assert store.get_study("1.9").state == "receiving"
    assert asm.evidence._checks["1.9"].why_not == "series 1.9.2: held 0 of 2 instances"


def test_evidence_state_is_dropped_for_a_study_completed_elsewhere(tmp_path):
    """A peer sharing the store completes a study this node asked about: its in-memory state must go, or a
    long-running node keeps one entry per such study for ever."""
    clock, pacs = Clock(), FakePacs({"1.9.1": 10})
    store, asm = make_assembler(tmp_path, pacs, clock)
    receive(store, clock, n=6)
    receive(store, clock, study="2.9", series="2.9.1", n=3)
    clock.t += 0.6
    asm.tick()
    assert set(asm.evidence._checks) == {"1.9", "2.9"}
    assert store.mark_complete("1.9", "quiet-period", clock.t)  # as the peer node does
    asm.tick()
    assert set(asm.evidence._checks) == {"2.9"}  # the study still receiving keeps what its PACS said
    assert asm.evidence._checks["2.9"].expected == 10


def test_unreachable_pacs_is_asked_once_per_interval_for_all_studies(tmp_path):
    clock = Clock()
    pacs = FakePacs(error=QueryError("cannot connect to PACS@127.0.0.1:104", unreachable=True))
    store, asm = make_assembler(tmp_path, pacs, clock, quiet=3.0)
    for k in range(5):
        receive(store, clock, study=f"1.{k}", series=f"1.{k}.1", n=2)
    clock.t += 0.6
    asm.tick()
    assert len(pacs.asked) == 1  # the first failure mutes the source for the others
    clock.t += 3
    done = asm.tick()
    assert sorted(done) == [f"1.{k}" for k in range(5)]
    assert {store.get_study(f"1.{k}").completion_reason for k in range(5)} == {"quiet-period"}


def test_a_query_that_failed_is_asked_again_after_the_min_interval(tmp_path):
    """A C-FIND that timed out (a busy PACS) is no answer: the study is asked again, not left to the quiet period."""
    clock = Clock()
    pacs = FakePacs({"1.9.1": 2}, error=QueryError("PACS@127.0.0.1:104 did not answer within 3 s"))
    store, asm = make_assembler(tmp_path, pacs, clock)
    receive(store, clock, n=2)
    clock.t += 0.6
    assert asm.tick() == [] and len(pacs.asked) == 1
    clock.t += 1
    asm.tick()
    assert len(pacs.asked) == 1  # within evidence_min_interval_s
    pacs.error = None
    clock.t += 5
    assert asm.tick() == [] and asm.tick() == ["1.9"]
    assert len(pacs.asked) == 2 and store.get_study("1.9").completion_reason == "counts-matched"


def test_a_study_muted_after_its_own_failure_keeps_its_error(tmp_path):
    """The refusal took a while, so the study's min interval ends before the source's mute: while muted, the
    study keeps its own error (what the quiet-period record reports), not just 'unreachable'."""
    clock = Clock()
    refused = QueryError("cannot connect to PACS@127.0.0.1:104", unreachable=True)

    def slow_refusal(*args):
        clock.t += 0.5
        raise refused

    store, asm = make_assembler(tmp_path, FakePacs(), clock)
    asm.evidence.query = slow_refusal
    receive(store, clock, n=2)
    clock.t += 0.6
    asm.tick()
    clock.t += 4.7  # 5.2 s after the question, 4.7 s after the refusal: still muted
    asm.tick()
    assert asm.evidence._checks["1.9"].why_not == "cannot connect to PACS@127.0.0.1:104"


def test_quiet_period_counts_from_when_the_node_opened_its_port(tmp_path):
    """A study half-received before a crash is not completed on restart at once: the sender resends first."""
    clock = Clock()
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    receive(store, clock, n=40)
    clock.t += 600  # the node was down for 10 min
    asm = Assembler(store, AuditLog(tmp_path / "audit.jsonl"), 1.0, clock=clock)
    asm.open_since = clock.t
    clock.t += 0.9
    assert asm.tick() == []
    receive(store, clock, n=80, start=40)  # the resend
    clock.t += 0.9
    assert asm.tick() == []
    clock.t += 0.2
    assert asm.tick() == ["1.9"] and store.get_study("1.9").instance_count == 120


def test_requires_reasons_name_the_rule_condition_only():
    rule = Rule.model_validate({"name": "r", "plugin": "p", "series": {"modality": "CT"},
                                "requires": [{"modality": "CT"}, {"series_description": "lung",
                                                                 "slice_thickness": [0, 1.5]}]})
    thick = SeriesFacts("1", "CT", "CHEST", "Body 5.0", 5.0, 100)
    thin = SeriesFacts("2", "CT", "CHEST", "Lung 1.0", 1.0, 300)
    ev = evaluate_all([rule], StudyFacts("1.2", "PACS", "CT THORAX SECRET", [thick]))
    assert not ev.matches and ev.missing_required == {"r": "requires.1: no series with series_description ~ "
                                                            "'lung', slice_thickness in [0, 1.5]"}
    assert "SECRET" not in str(ev.not_matched)
    ev = evaluate_all([rule], StudyFacts("1.2", "PACS", None, [thick, thin]))
    assert [job.series_uids for _, job in ev.matches] == [["2"]]


def test_sources_config():
    cfg = NodeConfig.model_validate({"sources": {"pacs": {"ae_title": "PACS1", "host": "10.0.0.5", "port": 104,
                                                          "match_calling_ae": ["PACS1", "PACS1_ROUTER"]}}})
    assert cfg.sources["pacs"].senders() == {"PACS1", "PACS1_ROUTER"}
    assert cfg.assemble.evidence_check_s == 0.4
    with pytest.raises(ValueError, match="calling AE 'X' is matched by both sources 'a' and 'b'"):
        NodeConfig.model_validate({"sources": {"a": {"ae_title": "X", "host": "h", "port": 1},
                                               "b": {"ae_title": "Y", "host": "h", "port": 2,
                                                     "match_calling_ae": "x"}}})


def test_pacs_answering_without_counts_gives_no_evidence():
    """A PACS whose C-FIND SCP ignores the count keys cannot vouch for completeness (a pynetdicom SCP here)."""
    from pydicom import Dataset
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from node.assemble.find import expected_counts

    def on_find(event):
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = event.identifier.StudyInstanceUID
        yield 0xFF00, ds

    scp = AE("NOCOUNTS")
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        src = Source(ae_title="NOCOUNTS", host="127.0.0.1", port=port, timeout_s=3)
        with pytest.raises(QueryError, match=rf"NOCOUNTS@127.0.0.1:{port} answered without "
                                             "NumberOfStudyRelatedInstances") as exc:
            expected_counts(src, "AINODE", "1.2.3")
        assert not exc.value.unreachable
    finally:
        server.shutdown()
