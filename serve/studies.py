"""Study results and patient timelines from study entries, as pure functions
(docs/STUDIES.md).

A study's fracture probability is its most suspicious view: the maximum over the instances
the model did not abstain on. One view can show a fracture that the others hide (a
scaphoid fracture on the oblique view only), so averaging views would dilute exactly the
finding a second reader is for. Abstentions are counted apart, never as a low probability.
No severity score exists: the model was not trained for one, so none is reported.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace

from orthovision.errors import InputError
from serve.store import StudyEntry

RULE = "max over views"
# A study's probability in words when every view abstained (none to compare).
ABSTAINED_TEXT = "none (every view abstained)"
FRACTURE = "fracture"
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
_DA = re.compile(r"(\d{4})(\d{2})(\d{2})")


class BadStudyUID(InputError):
    code = "bad_study_uid"


def check_study_uid(value: str, what: str = "X-Study-Instance-UID") -> str:
    """A DICOM UID (PS3.5 9.1: digits and dots, no empty or zero-led component, at most
    64 characters), else a 400 that says which rule failed (without echoing the value)."""
    if not value or len(value) > 64:
        raise BadStudyUID(f"{what} must be a DICOM UID of 1 to 64 characters")
    if not set(value) <= set("0123456789."):
        raise BadStudyUID(f"{what} must be a DICOM UID: digits and dots only")
    if not _UID.fullmatch(value):
        raise BadStudyUID(f"{what} must be a DICOM UID: no empty or zero-led component")
    return value


def iso_date(da: str | None) -> str | None:
    """DICOM DA (YYYYMMDD) -> ISO 8601; None when absent or not a real date."""
    match = _DA.fullmatch((da or "").strip())
    if not match:
        return None
    try:
        return dt.date(*map(int, match.groups())).isoformat()
    except ValueError:
        return None


def instance_entry(
    tenant: str,
    request_id: str,
    outcome: dict | InputError,
    study_uid: str,
    created_at: float,
    source: dict | None = None,
    patient_ref: str | None = None,
) -> StudyEntry:
    """The study entry of one answered instance: its v1 result's summary, or its error.
    `source` (the DICOM source) gives only its date and view: nothing identifying."""
    source = source or {}
    common = {
        "tenant": tenant,
        "study_uid": study_uid,
        "request_id": request_id,
        "created_at": created_at,
        "patient_ref": patient_ref,
        "study_date": source.get("StudyDate"),
        "view": source.get("ViewPosition"),
    }
    if isinstance(outcome, InputError):
        return StudyEntry(**common, state="failed", error=outcome.code)
    return StudyEntry(
        **common,
        body_part=(outcome.get("input") or {}).get("body_part"),
        label=outcome.get("label"),
        fracture_probability=(outcome.get("probabilities") or {}).get(FRACTURE),
        abstained=bool(outcome.get("abstained")),
        abstain_reason=outcome.get("abstain_reason"),
    )


def pending_entry(
    tenant: str, request_id: str, study_uid: str, created_at: float, patient_ref: str | None
) -> StudyEntry:
    """An instance registered on arrival, before it is answered."""
    return StudyEntry(tenant, study_uid, request_id, created_at, "pending", patient_ref)


def settled(entries: Iterable[StudyEntry], now: float, deadline_s: float) -> list[StudyEntry]:
    """Entries as they stand: one pending past the deadline lost the replica that held it
    (it will never be answered), so it counts as failed and a study can still complete."""
    out = []
    for e in entries:
        if e.state == "pending" and now - e.created_at > deadline_s:
            e = replace(e, state="failed", error="lost")
        out.append(e)
    return out


def _instance(e: StudyEntry) -> dict:
    out = {"request_id": e.request_id, "state": e.state, "view": e.view}
    if e.state == "done":
        out |= {
            "label": e.label,
            "fracture_probability": e.fracture_probability,
            "abstained": e.abstained,
            "abstain_reason": e.abstain_reason,
            "body_part": e.body_part,
        }
    elif e.state == "failed":
        out["error"] = e.error
    return out


def study_result(entries: Sequence[StudyEntry]) -> dict:
    """The study-level result: the most suspicious scored view drives it."""
    done = [e for e in entries if e.state == "done"]
    scored = [e for e in done if not e.abstained and e.fracture_probability is not None]
    driver = max(scored, key=lambda e: e.fracture_probability or 0.0, default=None)
    pending = sum(e.state == "pending" for e in entries)
    return {
        "rule": RULE,
        "fracture_probability": None if driver is None else driver.fracture_probability,
        "label": None if driver is None else driver.label,
        "driving_request_id": None if driver is None else driver.request_id,
        "instances": len(entries),
        "scored": len(scored),
        "abstained": sum(e.abstained for e in done),
        "failed": sum(e.state == "failed" for e in entries),
        "pending": pending,
        "complete": pending == 0,
    }


def _first(values: Iterable[str | None]) -> str | None:
    return next((v for v in values if v), None)


def study_body(study_uid: str, entries: Sequence[StudyEntry], instances: bool = True) -> dict:
    """A study as the API answers it: ids, date, anatomy, each instance and the result."""
    body = {
        "study_instance_uid": study_uid,
        "patient_ref": _first(e.patient_ref for e in entries),
        "study_date": iso_date(_first(e.study_date for e in entries)),
        "body_part": _first(e.body_part for e in entries),
        "result": study_result(entries),
    }
    if instances:
        body["instances"] = [_instance(e) for e in entries]
    return body


def _received(entries: Sequence[StudyEntry]) -> str:
    first = min(e.created_at for e in entries)
    return dt.datetime.fromtimestamp(first, dt.timezone.utc).date().isoformat()


def _change(study: dict, prior: dict | None) -> dict | None:
    """What changed since the prior study of the same body part, in numbers and words."""
    if prior is None:
        return None
    now, was = study["result"], prior["result"]
    p, q = now["fracture_probability"], was["fracture_probability"]
    when = prior["study_date"] or f"{prior['received']} (received)"
    now_text, was_text = (ABSTAINED_TEXT if x is None else f"{x:.2f}" for x in (p, q))
    return {
        "prior_study_instance_uid": prior["study_instance_uid"],
        "prior_study_date": prior["study_date"],
        "prior_fracture_probability": q,
        "fracture_probability_delta": None if p is None or q is None else round(p - q, 4),
        "prior_label": was["label"],
        "summary": f"fracture probability {now_text}, was {was_text} on the prior study of {when}",
    }


def timeline(patient_ref: str, entries: Sequence[StudyEntry]) -> dict:
    """A patient's studies newest first (study date, then arrival), each with what changed
    since the prior study of the same body part (a study of unknown anatomy is not
    compared)."""
    by_study: dict[str, list[StudyEntry]] = {}
    for e in entries:
        by_study.setdefault(e.study_uid, []).append(e)
    studies = [
        {**study_body(uid, group, instances=False), "received": _received(group)}
        for uid, group in by_study.items()
    ]
    studies.sort(
        key=lambda s: (s["study_date"] or s["received"], s["received"], s["study_instance_uid"]),
        reverse=True,
    )
    for index, study in enumerate(studies):
        part = study["body_part"]
        older = (s for s in studies[index + 1 :] if part and s["body_part"] == part)
        study["change"] = _change(study, next(older, None))
    return {"patient_ref": patient_ref, "order": "newest first", "studies": studies}


def prior_lines(study_uid: str, patient_timeline: dict) -> list[str]:
    """What a report says about a study's priors: the change since the prior study of the
    same body part, then each earlier study of that body part (date, result)."""
    listed = patient_timeline["studies"]
    index = next((i for i, s in enumerate(listed) if s["study_instance_uid"] == study_uid), None)
    if index is None:
        return []
    study = listed[index]
    part = study["body_part"]
    older = [s for s in listed[index + 1 :] if part and s["body_part"] == part]
    if not older:
        return []
    lines = [f"Change: {study['change']['summary']}."] if study.get("change") else []
    for s in older:
        p = s["result"]["fracture_probability"]
        shown = ABSTAINED_TEXT if p is None else f"{p:.2f}"
        when = s["study_date"] or f"{s['received']} (received)"
        lines.append(f"{when}, {part}: study fracture probability {shown}")
    return lines
