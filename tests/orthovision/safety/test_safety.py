"""Abstain on what the model never learned: scope from the DICOM header, the feature-space
OOD score, through the library, the CLI and the API."""

from __future__ import annotations

import json

import numpy as np
import pytest
from support.checkpoints import save_tiny_checkpoint
from support.data import SHARED, requires_shared
from support.images import make_dicom, make_png, radiograph
from support.liveapp import add_ood_detector

from orthovision.model.checkpoint import load_checkpoint
from orthovision.model.local import LocalPredictor
from orthovision.safety.ood import OODDetector
from orthovision.safety.scope import out_of_scope


def test_scope_from_body_part_and_description():
    assert out_of_scope("Chest ", {}) == "CHEST"
    assert out_of_scope("ABDOMEN", {"scope": {"out_of_scope_body_parts": ["ABDOMEN"]}})
    assert out_of_scope("HAND", {}) is None
    assert out_of_scope(None, {}, "THORAX PA") == "THORAX"
    assert out_of_scope(None, {}, "Non-ossifying fibroma of distal tibia") is None
    assert out_of_scope("HAND", {}, "CHEST") is None  # the body part is authoritative


def test_detector_separates_shifted_features_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    train = {"a": rng.normal(0, 1, (400, 16)), "b": rng.normal(0, 1, (400, 8))}
    labels = np.arange(400) % 2
    detector = OODDetector.fit(train, labels)
    near = {"a": rng.normal(0, 1, (50, 16)), "b": rng.normal(0, 1, (50, 8))}
    far = {"a": rng.normal(4, 1, (50, 16)), "b": rng.normal(4, 1, (50, 8))}
    assert detector.score(far).min() > detector.score(near).max()
    assert 1.0 < np.median(detector.score(near)) < 3.0  # ~1 per branch in distribution
    sha = detector.save(tmp_path / "ood.safetensors")
    again = OODDetector.load(tmp_path / "ood.safetensors", sha)
    assert np.allclose(again.score(far), detector.score(far), rtol=1e-4)
    with pytest.raises(ValueError):
        OODDetector.load(tmp_path / "ood.safetensors", "0" * 64)


@pytest.fixture()
def tiny_with_detector(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "ckpt")
    add_ood_detector(path, threshold=1e9)
    return path


def set_threshold(path, threshold: float) -> None:
    card = json.loads((path / "model_card.json").read_text())
    card["ood"]["threshold"] = threshold
    (path / "model_card.json").write_text(json.dumps(card))


def test_chest_dicom_abstains_out_of_scope(tiny_with_detector):
    local = LocalPredictor(load_checkpoint(tiny_with_detector))
    chest = make_dicom(pixels=radiograph().astype(np.uint16) << 2, BodyPartExamined="CHEST")
    hand = make_dicom(pixels=radiograph().astype(np.uint16) << 2, BodyPartExamined="HAND")
    p, _ = local.predict(chest)
    assert p.abstained and p.label is None and p.abstain_code == "out_of_scope"
    assert p.abstain_reason.startswith("out_of_scope") and sum(p.probabilities.values()) > 0.99
    assert local.predict(hand)[0].abstain_code != "out_of_scope"


def test_far_image_abstains_out_of_distribution(tiny_with_detector):
    local = LocalPredictor(load_checkpoint(tiny_with_detector))
    p, _ = local.predict(make_png(radiograph(seed=3)))
    assert p.ood_score is not None and np.isfinite(p.ood_score)
    set_threshold(tiny_with_detector, p.ood_score / 2)
    local = LocalPredictor(load_checkpoint(tiny_with_detector))
    p2, _ = local.predict(make_png(radiograph(seed=3)))
    assert p2.abstained and p2.abstain_code == "out_of_distribution"
    assert p2.label is None and "OOD score" in p2.abstain_reason


@requires_shared
def test_shared_chest_film_abstains_through_the_cli(tiny_with_detector, capsys):
    from orthovision.cli import main

    chest = SHARED / "dicom" / "RG1_J2KI.dcm"
    main(["predict", str(chest), "--json", "--checkpoint", str(tiny_with_detector)])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["abstained"] is True and result["abstain_code"] == "out_of_scope"
    main(["predict", str(chest), "--checkpoint", str(tiny_with_detector)])
    assert "abstained (out_of_scope" in capsys.readouterr().out


@pytest.mark.serve
def test_api_abstains_on_a_chest_dicom_and_reports_the_ood_score(live_app):
    from support.liveapp import post_with_retry

    chest = make_dicom(pixels=radiograph().astype(np.uint16) << 2, BodyPartExamined="CHEST")
    r = post_with_retry(
        live_app.client, "/v1/predict", content=chest, headers={"content-type": "application/dicom"}
    )
    body = r.json()
    assert r.status_code == 200 and body["abstained"] and body["abstain_code"] == "out_of_scope"
    r = post_with_retry(live_app.client, "/v1/predict", content=make_png(radiograph()))
    score = r.json()["ood_score"]
    assert isinstance(score, float) and np.isfinite(score)  # computed in the backbones


@pytest.mark.serve
def test_drift_metrics_per_tenant_under_load(live_app):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from support.liveapp import post_with_retry
    from support.metrics import metric_sum, scrape

    chest = make_dicom(pixels=radiograph().astype(np.uint16) << 2, BodyPartExamined="CHEST")
    bodies = [make_png(radiograph(s)) for s in range(12)] + [chest] * 4
    # (metric, labels) -> the least it must grow by: other tests feed the same counters.
    wanted = {
        ("ray_orthovision_results_total", ()): 16,
        ("ray_orthovision_abstentions_total", (("reason", "out_of_scope"),)): 4,
        ("ray_orthovision_ood_score_count", ()): 16,
        ("ray_orthovision_top_probability_count", ()): 16,
    }

    def values(text: str) -> dict:
        return {
            key: metric_sum(text, key[0], tenant="hospital-a", **dict(key[1])) for key in wanted
        }

    before = values(scrape(live_app.metrics_port))
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(lambda b: post_with_retry(live_app.client, "/v1/predict", content=b), bodies)
        )
    assert [r.status_code for r in codes] == [200] * len(bodies)
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:
        text = scrape(live_app.metrics_port)
        grown = {k: v - before[k] for k, v in values(text).items()}
        if all(grown[k] >= minimum for k, minimum in wanted.items()):
            break
        time.sleep(2)
    assert all(grown[k] >= minimum for k, minimum in wanted.items()), grown
    # Our labels are fixed sets: no file name, header value or patient identifier.
    ours = [line for line in text.splitlines() if line.startswith("ray_orthovision_")]
    assert ours and not [line for line in ours if "CHEST" in line or "PatientName" in line]


@pytest.mark.serve
@requires_shared
def test_api_abstains_on_the_shared_chest_film(live_app):
    from support.liveapp import post_with_retry

    body = (SHARED / "dicom" / "RG1_J2KI.dcm").read_bytes()
    r = post_with_retry(live_app.client, "/v1/predict", content=body)
    assert r.status_code == 200 and r.json()["abstain_code"] == "out_of_scope"
