"""A bad input is answered when its own preprocessing fails, not after its batch's forward
passes (the early answer of serve/classify.py)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from support.images import make_png, radiograph

# Slow lane (`make test-slow`): with the suite's tiny test models the forwards take a few ms,
# so both medians are Ray's own ~0.3 s overhead and the comparison is noise on a busy
# 2-core CI box (it failed once in four clean-clone runs). It means something on an idle
# machine or with the shipped model.
pytestmark = [pytest.mark.serve, pytest.mark.slow]


def test_bad_inputs_do_not_wait_for_the_forwards(live_app):
    good = make_png(radiograph(5, 640, 512))
    bad = good[: len(good) // 3]  # truncated PNG: rejected by the decoder

    def timed(body: bytes) -> tuple[int, float]:
        started = time.perf_counter()
        r = live_app.client.post("/v1/predict", content=body)
        return r.status_code, time.perf_counter() - started

    bodies = [good, bad] * 8
    timed(good)  # warm
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(timed, bodies))
    good_s = [s for (code, s), b in zip(outcomes, bodies, strict=True) if b is good and code == 200]
    bad_s = [s for (code, s), b in zip(outcomes, bodies, strict=True) if b is bad]
    assert len(good_s) == 8 and all(
        code == 422 for (code, _), b in zip(outcomes, bodies, strict=True) if b is bad
    )
    # Rejected inputs come back before the typical classified one. (Medians: with tiny test
    # models the forwards are short, and a p90 against a median flaked under CPU contention.)
    assert np.median(bad_s) < np.median(good_s), (sorted(bad_s), sorted(good_s))
