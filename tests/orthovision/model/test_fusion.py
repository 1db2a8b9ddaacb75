import pytest
import torch

from orthovision.labels import CLASSES
from orthovision.model.decision import decide
from orthovision.model.fusion import fuse_logits, fusion_weights_from_params

VALIDATED = ("fracture", "non-affected")


def test_fusion_weights_softmax_of_log_init():
    w = fusion_weights_from_params(torch.log(torch.tensor([0.4, 0.6])))
    assert torch.allclose(w, torch.tensor([0.4, 0.6]))


def test_fuse_logits_is_weighted_probability_average():
    a, b = torch.tensor([[2.0, 0, 0, 0]]), torch.tensor([[0, 2.0, 0, 0]])
    w = torch.tensor([0.4, 0.6])
    fused = fuse_logits([a, b], w, temperature=1.0)
    expected = 0.4 * torch.softmax(a, -1) + 0.6 * torch.softmax(b, -1)
    assert torch.allclose(fused, expected)
    assert torch.allclose(fused.sum(-1), torch.ones(1))


def test_temperature_flattens():
    lg = torch.tensor([[4.0, 0, 0, 0]])
    sharp = fuse_logits([lg], torch.ones(1), 1.0)
    flat = fuse_logits([lg], torch.ones(1), 4.0)
    assert flat.max() < sharp.max()


def test_fuse_logits_branch_count_mismatch():
    with pytest.raises(ValueError):
        fuse_logits([torch.zeros(1, 4)], torch.tensor([0.5, 0.5]), 1.0)


@pytest.mark.parametrize(
    ("probs", "label", "abstained", "reason_part"),
    [
        ([0.9, 0.1, 0.0, 0.0], "fracture", False, None),
        ([0.1, 0.8, 0.05, 0.05], "non-affected", False, None),
        ([0.45, 0.40, 0.1, 0.05], None, True, "below the abstain threshold"),
        ([0.05, 0.05, 0.85, 0.05], None, True, "not validated"),
        ([0.05, 0.05, 0.05, 0.85], None, True, "not validated"),
    ],
)
def test_decide(probs, label, abstained, reason_part):
    d = decide(probs, VALIDATED, 0.5, CLASSES)
    assert d.label == label and d.abstained is abstained
    if reason_part:
        assert reason_part in d.reason


OP = {"class": "fracture", "threshold": 0.3}


@pytest.mark.parametrize(
    ("probs", "label", "abstained"),
    [
        ([0.35, 0.60, 0.03, 0.02], "fracture", False),  # at the operating point: called
        ([0.25, 0.70, 0.03, 0.02], "non-affected", False),  # below it: the other class
        ([0.20, 0.10, 0.65, 0.05], None, True),  # an unvalidated top class still abstains
        ([0.29, 0.31, 0.30, 0.10], None, True),  # below it, and the runner-up is unsure
    ],
)
def test_operating_point_calls_fracture_from_its_threshold(probs, label, abstained):
    d = decide(probs, VALIDATED, 0.5, CLASSES, OP)
    assert (d.label, d.abstained) == (label, abstained)


def test_abstain_reason_never_reads_as_a_contradiction():
    d = decide([0.4996, 0.4, 0.05, 0.0504], VALIDATED, 0.5, CLASSES)
    assert "0.499 is below the abstain threshold 0.500" in d.reason
