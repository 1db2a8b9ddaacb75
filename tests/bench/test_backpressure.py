"""At 3x capacity only 200/429/503 come back (never a 500 or a dropped connection)."""

from __future__ import annotations

import json

import pytest
from support.images import make_jpeg
from support.liveapp import KEY, radiograph

from bench.backpressure import run

pytestmark = pytest.mark.serve


def test_three_times_capacity_sheds_cleanly(live_app):
    result = run(live_app.url, make_jpeg(radiograph(4)), KEY, duration_s=8.0, factor=3.0)
    print("backpressure:", json.dumps(result))
    statuses = {int(k): v for k, v in result["statuses"].items()}
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses.get(200, 0) > 0
    assert result["capacity_rps"] > 0
