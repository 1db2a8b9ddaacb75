"""Scale-out on this machine (make test-slow): a real two-node Ray cluster survives losing a
node with no request lost, and Serve autoscaling goes up under load and back down after.

Both start `ray start` nodes of their own on loopback (bench.raycluster) and stop them;
the printed figures are the ones docs/OPERATIONS.md quotes.
"""

from __future__ import annotations

import sys

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.serve,
    pytest.mark.skipif(sys.platform != "linux", reason="bench.raycluster reads /proc"),
]


def test_losing_the_model_node_loses_no_request_after_retries():
    from bench.multinode import run

    result = run(requests=160, concurrency=4, kill_after=40, down_s=3.0)
    assert result["backbones_on_model_node"], "backbones must run on the second node"
    assert result["failed_attempts"] > 0, "the kill must have hurt, or the test shows nothing"
    assert result["lost_after_retries"] == 0
    assert result["succeeded"] == result["requests_sent"]
    assert result["time_to_recover_s"] is not None and result["time_to_recover_s"] < 180


def test_preprocessor_and_a_backbone_scale_up_under_load_and_back_down():
    from bench.autoscale import WATCHED, run

    result = run(concurrency=12, max_requests=3000)
    peak = result["peak_replicas"]
    assert peak["Preprocessor"] >= 2
    assert max(peak[n] for n in WATCHED if n.startswith("Backbone")) >= 2
    last = result["samples"][-1]
    assert last["phase"] == "idle" and all(last[n] == 1 for n in WATCHED), last
    assert result["lost_after_retries"] == 0
