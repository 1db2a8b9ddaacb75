"""Study results and timelines as pure functions (serve/studies.py)."""

from __future__ import annotations

import pytest

from orthovision.errors import QualityRejected
from serve.store import StudyEntry
from serve.studies import (
    RULE,
    BadStudyUID,
    check_study_uid,
    instance_entry,
    iso_date,
    settled,
    study_body,
    timeline,
)

REF = "c" * 64


def done(rid: str, p: float | None, study="1.2.3", date="20260103", part="HAND", **kw):
    return StudyEntry(
        "t",
        study,
        rid,
        kw.pop("at", 1.0e9),
        "done",
        REF,
        date,
        part,
        label=kw.pop("label", None),
        fracture_probability=p,
        **kw,
    )


def test_study_uid_rules_say_why():
    assert check_study_uid("1.2.840.10008.1") == "1.2.840.10008.1"
    for bad, why in [
        ("", "1 to 64"),
        ("1." * 40 + "1", "1 to 64"),
        ("1.2.abc", "digits and dots"),
        ("1..2", "zero-led"),
        ("1.02", "zero-led"),
        ("1.2.", "zero-led"),
    ]:
        with pytest.raises(BadStudyUID) as err:
            check_study_uid(bad)
        assert why in err.value.message and err.value.http_status == 400
        assert bad not in err.value.message or not bad


def test_the_most_suspicious_view_drives_the_study():
    entries = [
        done("ap", 0.10, view="AP", label="non-affected"),
        done("lat", 0.82, view="LAT", label="fracture"),
        done("obl", 0.95, abstained=True, abstain_reason="out_of_distribution: far"),
        StudyEntry("t", "1.2.3", "bad", 1.0e9, "failed", REF, error="quality_rejected"),
    ]
    body = study_body("1.2.3", entries)
    result = body["result"]
    assert result["rule"] == RULE == "max over views"
    # The abstained view's 0.95 never counts: abstentions are counted apart.
    assert (result["fracture_probability"], result["driving_request_id"]) == (0.82, "lat")
    assert result["label"] == "fracture"
    counts = {k: result[k] for k in ("instances", "scored", "abstained", "failed", "pending")}
    assert counts == {"instances": 4, "scored": 2, "abstained": 1, "failed": 1, "pending": 0}
    assert result["complete"] is True
    assert body["study_date"] == "2026-01-03" and body["body_part"] == "HAND"
    assert [i["request_id"] for i in body["instances"]] == ["ap", "lat", "obl", "bad"]
    assert body["instances"][3] == {
        "request_id": "bad",
        "state": "failed",
        "view": None,
        "error": "quality_rejected",
    }


def test_pending_instances_make_a_study_incomplete_until_their_deadline():
    pending = StudyEntry("t", "1.2.3", "p", 100.0, "pending", REF)
    body = study_body("1.2.3", settled([done("a", 0.3), pending], now=110.0, deadline_s=60))
    assert body["result"]["complete"] is False and body["result"]["pending"] == 1
    lost = settled([pending], now=200.0, deadline_s=60)
    assert lost[0].state == "failed" and lost[0].error == "lost"
    assert study_body("1.2.3", lost)["result"]["complete"] is True


def test_every_view_abstained_gives_no_probability():
    result = study_body("1.2.3", [done("a", 0.9, abstained=True)])["result"]
    assert result["fracture_probability"] is None and result["driving_request_id"] is None


def test_timeline_is_newest_first_and_compares_with_the_prior_of_the_same_body_part():
    entries = [
        done("old", 0.10, study="1.1", date="20260103"),
        done("knee", 0.50, study="1.2", date="20260110", part="KNEE"),
        done("new-a", 0.20, study="1.3", date="20260201"),
        done("new-b", 0.82, study="1.3", date="20260201"),
    ]
    body = timeline(REF, entries)
    assert body["order"] == "newest first"
    assert [s["study_instance_uid"] for s in body["studies"]] == ["1.3", "1.2", "1.1"]
    newest, knee, oldest = body["studies"]
    assert newest["change"]["summary"] == (
        "fracture probability 0.82, was 0.10 on the prior study of 2026-01-03"
    )
    assert newest["change"]["prior_study_instance_uid"] == "1.1"
    assert newest["change"]["fracture_probability_delta"] == 0.72
    assert knee["change"] is None and oldest["change"] is None
    assert "instances" not in newest and newest["result"]["instances"] == 2


def test_study_without_a_date_sorts_by_arrival_and_says_so():
    entries = [done("a", 0.4, study="1.1", date=None, at=1.0e9), done("b", 0.5, study="1.2")]
    body = timeline(REF, entries)
    assert [s["study_instance_uid"] for s in body["studies"]] == ["1.2", "1.1"]
    assert body["studies"][0]["change"]["summary"].endswith("2001-09-09 (received)")


def test_instance_entry_keeps_a_summary_and_no_identifier():
    result = {
        "label": "fracture",
        "abstained": False,
        "probabilities": {"fracture": 0.7, "non-affected": 0.3},
        "input": {"body_part": "HAND"},
    }
    source = {
        "PatientID": "PID",
        "PatientName": "N^P",
        "StudyDate": "20260103",
        "ViewPosition": "PA",
    }
    e = instance_entry("t", "r", result, "1.2.3", 5.0, source, REF)
    assert (e.state, e.fracture_probability, e.view, e.study_date) == (
        "done",
        0.7,
        "PA",
        "20260103",
    )
    assert "PID" not in e.to_json() and "N^P" not in e.to_json()
    failed = instance_entry("t", "r2", QualityRejected("too dark"), "1.2.3", 5.0)
    assert (failed.state, failed.error) == ("failed", "quality_rejected")


def test_iso_date():
    assert iso_date("20260103") == "2026-01-03"
    assert iso_date("20261340") is None and iso_date(None) is None and iso_date("2026") is None
