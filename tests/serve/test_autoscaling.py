"""The autoscaling policy (serve/autoscaling.py): up with the load, never down while the load
that needed the replicas is still there, down when it has gone; rendered into every Serve
config with its hysteresis."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orthovision.config import DeploymentConfig
from serve.autoscaling import POLICY_PATH, Hysteresis, desired_replicas
from serve.manifests.serve_config import deployment_options


def context(current: int, ongoing: float, target: float = 1.0) -> SimpleNamespace:
    """The fields of Ray's AutoscalingContext the policy reads."""
    config = SimpleNamespace(get_target_ongoing_requests=lambda: target)
    return SimpleNamespace(
        current_num_replicas=current,
        target_num_replicas=current,
        total_num_requests=ongoing,
        config=config,
    )


@pytest.mark.parametrize(
    ("current", "load", "wanted"),
    [
        (1, 1.0, 1),  # exactly at the target: enough
        (1, 1.3, 2),  # over it: up
        (1, 2.6, 3),
        (2, 1.3, 2),  # the constant load that needed 2 no longer fills them: hold
        (2, 1.0, 2),
        (2, 0.6, 2),  # one replica would run at 60 % of the target: still hold
        (2, 0.5, 1),  # at half the target on one replica: down
        (3, 0.9, 2),
        (3, 0.0, 0),  # no load: to Ray's minimum (the bounds are applied around the policy)
    ],
)
def test_desired_replicas(current: int, load: float, wanted: int) -> None:
    assert desired_replicas(current, load, scale_down_below=0.5) == wanted


def test_the_flapping_trace_of_issue_22_holds_at_two() -> None:
    """Backbone went 1 -> 2 -> 1 under constant load with Ray's default policy (the load per
    replica halves when a second replica comes, and the default wants 1 again)."""
    policy = Hysteresis(scale_down_below=0.5)
    assert policy(context(current=1, ongoing=1.6))[0] == 2
    for ongoing in (1.6, 1.2, 0.9, 0.7):  # the same offered load, spread over two
        assert policy(context(current=2, ongoing=ongoing))[0] == 2
    assert policy(context(current=2, ongoing=0.0))[0] == 0  # the load stopped


def test_target_counts() -> None:
    policy = Hysteresis()
    assert policy(context(current=1, ongoing=3.0, target=2.0))[0] == 2


def test_rendered_autoscaling_config_names_the_policy() -> None:
    options = deployment_options(
        DeploymentConfig(min_replicas=1, max_replicas=4, scale_down_below=0.4)
    )
    policy = options["autoscaling_config"]["policy"]
    assert policy == {"policy_function": POLICY_PATH, "policy_kwargs": {"scale_down_below": 0.4}}
    # Ray's own schema accepts it and loads the class from its import path.
    from ray.serve.config import AutoscalingConfig

    parsed = AutoscalingConfig(**options["autoscaling_config"])
    assert parsed.policy.policy_function == POLICY_PATH


def test_a_bad_hysteresis_is_refused() -> None:
    with pytest.raises(ValueError):
        Hysteresis(scale_down_below=1.0)
