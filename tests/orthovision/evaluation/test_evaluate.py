"""Evaluation: every metric key, plots, ablation rows, honest 'no samples' classes, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support.datasets import write_fracture_layout
from support.training import tiny_cfg

from orthovision import cli
from orthovision.evaluation.metrics import (
    NO_SAMPLES,
    calibration,
    group_level,
    per_class_table,
    roc_auc_ovr,
)
from orthovision.evaluation.results import compute_report
from orthovision.evaluation.run import evaluate_checkpoint
from orthovision.labels import CLASSES
from orthovision.training.loop import train

PLOTS = (
    "confusion_matrix.png",
    "confusion_matrix_group.png",
    "roc.png",
    "reliability.png",
    "training_curves.png",
)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    fx = write_fracture_layout(root / "fx", groups_per_class=6, per_group=2)
    cfg = tiny_cfg(root, [{"kind": "fracture-xray", "path": str(fx)}], max_steps_per_epoch=1)
    return train(cfg, root / "ckpt", progress=False), fx


def test_per_class_table_matches_hand_counts():
    y = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 1, 1, 0])
    rows = per_class_table(y, pred, CLASSES)
    frac = rows["fracture"]
    assert frac["precision"] == pytest.approx(2 / 3) and frac["recall"] == pytest.approx(2 / 3)
    assert frac["specificity"] == pytest.approx(2 / 3)
    assert frac["accuracy"] == pytest.approx(4 / 6)
    assert frac["sensitivity"] == frac["recall"]
    # No fake numbers for classes without samples.
    assert rows["tumor-benign"] == {"support": 0, "status": NO_SAMPLES, "predicted": 0}


def test_auc_ci_brackets_the_estimate_and_absent_classes_say_so():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    probs = np.zeros((300, 4))
    probs[:, 0] = np.clip(0.5 + (0.5 - y) * 0.4 + rng.normal(0, 0.25, 300), 0, 1)
    probs[:, 1] = 1 - probs[:, 0]
    groups = [str(i // 3) for i in range(300)]
    auc = roc_auc_ovr(y, probs, CLASSES, groups, n_bootstrap=200)
    lo, hi = auc["fracture"]["ci95"]
    assert lo <= auc["fracture"]["auc"] <= hi and auc["fracture"]["auc"] > 0.8
    assert auc["tumor-malignant"] == {"status": NO_SAMPLES}


def test_ece_is_zero_when_confidence_equals_accuracy():
    y = np.array([0, 0, 0, 1])
    probs = np.tile([0.75, 0.25, 0.0, 0.0], (4, 1))
    assert calibration(y, probs)["ece"] == pytest.approx(0.0)
    assert calibration(y, np.tile([1.0, 0, 0, 0], (4, 1)))["ece"] == pytest.approx(0.25)


def test_group_level_takes_the_majority_vote():
    y = np.array([0, 0, 0, 1])
    probs = np.array([[0.9, 0.1, 0, 0], [0.4, 0.6, 0, 0], [0.8, 0.2, 0, 0], [0.3, 0.7, 0, 0]])
    g_true, g_vote, g_mean, names = group_level(y, probs, ["a", "a", "a", "b"])
    assert names == ["a", "b"] and g_true.tolist() == [0, 1]
    assert g_vote.argmax(1).tolist() == [0, 1]
    assert g_mean[0, 0] == pytest.approx(0.7)


def test_ablation_lists_the_paper_variants():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 40)
    logits = {"a": rng.normal(0, 1, (40, 4)), "b": rng.normal(0, 1, (40, 4))}
    report = compute_report(
        logits,
        y,
        [str(i) for i in range(40)],
        CLASSES,
        fusion_weights=[0.4, 0.6],
        branch_val_accuracy={"a": 0.7, "b": 0.8},
        n_bootstrap=10,
    )
    variants = [r["variant"] for r in report.ablation]
    assert variants[:5] == [
        "a alone",
        "b alone",
        "probability average",
        "validation-accuracy weighting",
        "learned fusion",
    ]
    assert variants[5].startswith("learned fusion + reject below")
    assert [r["threshold"] for r in report.reject][0] == 0.5


def test_evaluate_checkpoint_writes_every_metric_and_plot(tiny_checkpoint, tmp_path: Path):
    ckpt, data = tiny_checkpoint
    report = evaluate_checkpoint(ckpt, data, tmp_path / "out", n_bootstrap=20)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for level in ("image_level", "group_level"):
        block = metrics[level]
        for key in (
            "accuracy",
            "macro_f1",
            "per_class",
            "roc_auc",
            "confusion_matrix",
            "calibration",
            "macro_f1",
            "weighted_f1",
            "macro_precision",
            "macro_recall",
            "macro_specificity",
        ):
            assert key in block, (level, key)
        frac = block["per_class"]["fracture"]
        assert {"precision", "recall", "f1", "accuracy", "sensitivity", "specificity"} <= set(frac)
        assert block["per_class"]["tumor-benign"]["status"] == NO_SAMPLES
        assert "ci95" in block["roc_auc"]["fracture"]
    assert metrics["image_level"]["n"] == 24 and metrics["group_level"]["n"] == 12
    assert "ece" in metrics["image_level"]["calibration"]
    assert len(metrics["fusion_ablation"]) == 6
    assert metrics["not_validated_classes"] == ["tumor-benign", "tumor-malignant"]
    for name in PLOTS:
        png = (tmp_path / "out" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "Fusion ablation" in (tmp_path / "out" / "report.md").read_text()
    assert report.summary()["image_level"]["n"] == 24


def test_evaluate_split_uses_the_recorded_held_out_images(tiny_checkpoint):
    ckpt, data = tiny_checkpoint
    test = evaluate_checkpoint(ckpt, data, split="test", n_bootstrap=0)
    rows = (ckpt / "splits.csv").read_text().splitlines()[1:]
    assert test.image["n"] == sum(r.split(",")[3] == "test" for r in rows) > 0


def test_cli_evaluate_prints_the_json_summary(tiny_checkpoint, tmp_path: Path, capsys):
    ckpt, data = tiny_checkpoint
    code = cli.main(
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(data),
            "--bootstrap",
            "10",
            "--no-progress",
        ]
    )
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"image_level", "group_level", "fusion_ablation"} <= set(summary)
    assert summary["image_level"]["per_class"]["tumor-malignant"]["status"] == NO_SAMPLES
