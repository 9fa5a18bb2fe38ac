"""Rule matching on study and series attributes."""

from node.config.schema import Rule
from node.route import SeriesFacts, StudyFacts, evaluate


def series(uid="1.1", modality="CT", body_part="CHEST", desc="Lung 1.0 B70f", thick=1.0, n=200):
    return SeriesFacts(uid, modality, body_part, desc, thick, n)


def study(*s, calling_ae="ORTHANC", desc="CT THORAX"):
    return StudyFacts("1.2.3", calling_ae, desc, list(s))


def rule(**kw):
    base = {"name": "r", "plugin": "ct_lung"}
    base.update(kw)
    return Rule.model_validate(base)


def test_modality_body_part_case_insensitive():
    r = rule(series={"modality": "ct", "body_part": ["chest"]})
    assert evaluate([r], study(series()))
    assert not evaluate([r], study(series(modality="MR")))
    assert not evaluate([r], study(series(body_part="HEAD")))


def test_description_regex_and_thickness_range_and_count():
    r = rule(series={"series_description": r"lung|thorax", "slice_thickness": [0.5, 2.0], "min_instances": 100})
    assert evaluate([r], study(series()))
    assert not evaluate([r], study(series(desc="Soft tissue")))
    assert not evaluate([r], study(series(thick=5.0)))
    assert not evaluate([r], study(series(thick=None)))
    assert not evaluate([r], study(series(n=50)))


def test_calling_ae_condition():
    r = rule(study={"calling_ae": ["PACS1"]})
    assert not evaluate([r], study(series(), calling_ae="ORTHANC"))
    assert evaluate([r], study(series(), calling_ae="pacs1"))


def test_rules_in_order_and_several_can_match():
    a, b = rule(name="a", priority="stat"), rule(name="b")
    jobs = evaluate([a, b], study(series()))
    assert [j.rule for _, j in jobs] == ["a", "b"]
    assert jobs[0][1].priority == "stat"


def test_picks_largest_then_thinnest_matching_series():
    r = rule(series={"modality": "CT"})
    s1, s2, s3 = series("1", n=100, thick=1.0), series("2", n=300, thick=1.0), series("3", n=300, thick=0.6)
    [(_, job)] = evaluate([r], study(s1, s2, s3, series("4", modality="SR", n=1000)))
    assert job.series_uids == ["3"]


def test_no_match():
    assert evaluate([rule(series={"modality": "MR"})], study(series())) == []
