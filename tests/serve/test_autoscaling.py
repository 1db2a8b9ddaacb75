"""The autoscaling policy (serve/autoscaling.py): up with the load, never down while the load
that needed the replicas is still there, down when it has gone; rendered into every Serve
config with its hysteresis."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from orthovision.config import DeploymentConfig
from serve.autoscaling import BUSY_STAT, POLICY_PATH, Hysteresis, desired_replicas
from serve.busy import BusyMeter
from serve.manifests.serve_config import deployment_options


def context(
    current: int, ongoing: float, target: float = 1.0, busy: list[float] | None = None
) -> SimpleNamespace:
    """The fields of Ray's AutoscalingContext the policy reads."""
    config = SimpleNamespace(get_target_ongoing_requests=lambda: target)
    stats = {BUSY_STAT: {f"replica{i}": b for i, b in enumerate(busy)}} if busy else {}
    return SimpleNamespace(
        current_num_replicas=current,
        target_num_replicas=current,
        total_num_requests=ongoing,
        aggregated_metrics=stats,
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


def test_a_stage_that_reports_busy_time_scales_on_it_not_on_waiting_calls() -> None:
    policy = Hysteresis(scale_down_below=0.5, target_busy=0.7)
    # Two calls ongoing but the replica works 18% of the time: not the bottleneck.
    assert policy(context(current=1, ongoing=2.0, busy=[0.18]))[0] == 1
    # One call ongoing and the replica works all the time: it is.
    assert policy(context(current=1, ongoing=1.0, busy=[1.0]))[0] == 2
    # Two replicas sharing that work (0.5 each): held, not stepped down.
    assert policy(context(current=2, ongoing=1.0, busy=[0.5, 0.5]))[0] == 2
    assert policy(context(current=2, ongoing=0.0, busy=[0.05, 0.05]))[0] == 1


def test_busy_meter_integrates_work_in_progress() -> None:
    now = [0.0]
    meter = BusyMeter(clock=lambda: now[0])
    with meter.working():
        now[0] = 1.0
        with meter.working():  # a second call at once counts twice
            now[0] = 2.0
        now[0] = 3.0
        assert meter.take() == pytest.approx(4.0 / 3.0)  # in progress: counted so far
        now[0] = 4.0
    now[0] = 6.0
    assert meter.take() == pytest.approx(1.0 / 3.0)
    assert meter.stats() == {BUSY_STAT: 0.0}


def test_target_counts() -> None:
    policy = Hysteresis()
    assert policy(context(current=1, ongoing=3.0, target=2.0))[0] == 2


def test_rendered_autoscaling_config_names_the_policy() -> None:
    options = deployment_options(
        DeploymentConfig(min_replicas=1, max_replicas=4, scale_down_below=0.4)
    )
    policy = options["autoscaling_config"]["policy"]
    assert policy == {
        "policy_function": POLICY_PATH,
        "policy_kwargs": {"scale_down_below": 0.4, "target_busy": 0.7},
    }
    # Ray's own schema accepts it and loads the class from its import path.
    from ray.serve.config import AutoscalingConfig

    parsed = AutoscalingConfig(**options["autoscaling_config"])
    assert parsed.policy.policy_function == POLICY_PATH


def test_a_bad_hysteresis_is_refused() -> None:
    with pytest.raises(ValueError):
        Hysteresis(scale_down_below=1.0)
