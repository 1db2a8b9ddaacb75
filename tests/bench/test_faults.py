"""Faults under load on the live app (CI-sized): nothing is lost, nothing stays pending."""

from __future__ import annotations

import json

import pytest
from support.images import make_jpeg
from support.liveapp import KEY, radiograph

from bench.faults import kill_backbone_under_load, kill_explainer_with_pending

pytestmark = pytest.mark.serve


def test_sigkill_backbone_replica_loses_nothing(live_app):
    result = kill_backbone_under_load(
        live_app.url, make_jpeg(radiograph(6)), {"X-API-Key": KEY}, requests=40, concurrency=4
    )
    print("backbone kill:", json.dumps(result))
    assert result["lost_after_retries"] == 0
    assert result["replacement_ready_s"] is not None and result["replacement_ready_s"] <= 60
    assert live_app.client.get("/readyz").status_code == 200


def test_killed_explainer_never_leaves_explanations_pending(live_app):
    result = kill_explainer_with_pending(
        live_app.url, make_jpeg(radiograph(8)), {"X-API-Key": KEY}, n=6
    )
    print("explainer kill:", json.dumps(result))
    assert result["pending_at_kill"] >= 1, "nothing was pending when the Explainer died"
    assert result["still_pending"] == 0
    assert result["done"] + result["failed"] == 6
