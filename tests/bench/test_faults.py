"""Faults under load on the live app (CI-sized): nothing is lost, no 500, nothing stays
pending, and the service comes back to speed."""

from __future__ import annotations

import json

import pytest
from support.images import make_jpeg
from support.liveapp import KEY, radiograph

from bench.faults import kill_explainer_with_pending, kill_under_load

pytestmark = pytest.mark.serve


@pytest.mark.parametrize("deployment", ["Backbone_resnet18", "Fusion"])
def test_sigkilled_replica_loses_nothing_and_throughput_recovers(live_app, deployment):
    result = kill_under_load(
        live_app.url, make_jpeg(radiograph(6)), {"X-API-Key": KEY}, deployment, concurrency=4
    )
    print(f"{deployment} kill:", json.dumps(result))
    assert result["lost_after_retries"] == 0
    assert result["http_500"] == 0
    assert result["replacement_ready_s"] is not None and result["replacement_ready_s"] <= 60
    assert result["first_success_after_kill_s"] is not None
    assert result["first_success_after_kill_s"] <= 60
    # Throughput comes back: the window after the replacement is up serves at least 70% of
    # the rate before the kill (a CI-sized 10 s window on a shared machine; the node-loss
    # test holds 80% over a minute).
    assert result["throughput_ratio"] is not None and result["throughput_ratio"] >= 0.7
    assert live_app.client.get("/readyz").status_code == 200


def test_killed_explainer_never_leaves_explanations_pending(live_app):
    result = kill_explainer_with_pending(
        live_app.url, make_jpeg(radiograph(8)), {"X-API-Key": KEY}, n=6
    )
    print("explainer kill:", json.dumps(result))
    assert result["pending_at_kill"] >= 1, "nothing was pending when the Explainer died"
    assert result["still_pending"] == 0
    assert result["done"] + result["failed"] == 6
    assert result["explanation_after_recovery"] == "done"
