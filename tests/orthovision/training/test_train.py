"""train(cfg) -> checkpoint folder: tiny backbones, synthetic radiographs, a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from support.data import SHARED, requires_shared
from support.datasets import btxrd_rows, write_btxrd_layout, write_fracture_layout
from support.training import tiny_cfg

from orthovision.config import OrthoVisionConfig
from orthovision.datasets.loading import prepare_data
from orthovision.model.checkpoint import load_checkpoint
from orthovision.model.probabilities import fused_probabilities
from orthovision.training.calibration import fit_temperature
from orthovision.training.compare import compare_backbones
from orthovision.training.epochs import mixup
from orthovision.training.loop import train


@pytest.fixture(scope="module")
def four_class_sources(tmp_path_factory) -> list[dict]:
    """A fracture-xray-shaped folder and a BTXRD-shaped one (the real CSV format)."""
    root = tmp_path_factory.mktemp("data")
    fx = write_fracture_layout(root / "fx", groups_per_class=5, per_group=2)
    rows = btxrd_rows()
    # Enough of each tumour class for train and validation.
    rows = [{**r, "image_id": f"{i}-{r['image_id']}"} for i in range(3) for r in rows]
    bt = write_btxrd_layout(root / "bt", rows)
    return [{"kind": "fracture-xray", "path": str(fx)}, {"kind": "btxrd", "path": str(bt)}]


@pytest.mark.parametrize("mode", ["branches-then-ensemble", "joint"])
def test_train_writes_a_loadable_checkpoint(tmp_path: Path, four_class_sources, mode):
    cfg = tiny_cfg(tmp_path, four_class_sources, mode=mode)
    out = train(cfg, tmp_path / "ckpt", progress=False)

    ckpt = load_checkpoint(out)
    card = ckpt.card
    assert card["trained"] is True
    assert card["classes"] == list(cfg.model.classes)
    # Both sources together cover all four classes, each with train and val data.
    assert set(card["validated_classes"]) == set(cfg.model.classes)
    assert card["training"]["mode"] == mode
    assert card["training"]["epochs_run"] == 1
    assert card["training"]["calibration"]["fitted"] is True
    assert card["temperature"] == pytest.approx(card["training"]["calibration"]["temperature"])
    names = [d["name"] for d in card["data"]["datasets"]]
    assert names == ["fracture-xray", "btxrd"]
    assert card["data"]["datasets"][0]["licence"] == "ODC-By 1.0"
    assert "attribution" in card["data"]["datasets"][0]
    assert card["metrics"]["split"] == "test"
    assert {"image_level", "group_level", "fusion_ablation"} <= set(card["metrics"])
    # The resolved config sits next to the checkpoint and round-trips.
    resolved = OrthoVisionConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text()))
    assert resolved == cfg
    assert (out / "splits.csv").is_file() and (out / "history.json").is_file()
    if mode == "branches-then-ensemble":
        assert card["training"]["fusion"]["fitted_on"] == "val"
        assert set(card["training"]["best_epochs"]) == {"efficientnet_b0", "resnet18"}
    else:
        assert set(card["training"]["best_epochs"]) == {"fused"}


RECIPE = {
    "optimizer": "adamw",
    "lr": 3e-4,
    "branch_lr": {"resnet18": 1e-3},
    "weight_decay": 0.02,
    "schedule": "cosine",
    "warmup_epochs": 1,
    "label_smoothing": 0.1,
    "ema_decay": 0.9,
    "augmentation": "radiograph",
    "group_balanced": True,
    "mixup_alpha": 0.2,
    "selection_metric": "auc",
}


def test_recipe_options_train_select_by_auc_and_set_an_operating_point(tmp_path: Path):
    fx = write_fracture_layout(tmp_path / "fx", groups_per_class=6, per_group=2)
    sources = [{"kind": "fracture-xray", "path": str(fx)}]
    cfg = tiny_cfg(tmp_path, sources, epochs=3, patience=1, min_epochs=2, **RECIPE)
    out = train(cfg, tmp_path / "ckpt", progress=False)
    card = load_checkpoint(out).card
    history = json.loads((out / "history.json").read_text())
    assert 2 <= len(history) <= 3
    assert all("auc" in h["val"]["fused"] for h in history)
    # Cosine reaches 0 at the last configured epoch.
    assert history[0]["lr_factor"] > history[-1]["lr_factor"] >= 0
    assert card["training"]["recipe"]["ema_decay"] == 0.9
    assert card["training"]["recipe"]["mixup_alpha"] == 0.2
    op = card["operating_point"]
    assert op["class"] == "fracture" and op["chosen_on"] == "val"
    assert op["val_sensitivity"] >= 0.90 and 0 <= op["threshold"] <= 1
    # Reported on the held-out test split at the validation threshold.
    test_op = card["metrics"]["operating_point"]
    assert test_op["threshold"] == op["threshold"] and 0 <= test_op["specificity"] <= 1
    # Safety sections: the OOD detector beside the weights, scope, drift baseline.
    assert (out / card["ood"]["file"]).is_file() and card["ood"]["threshold"] > 0
    assert card["scope"]["out_of_scope_body_parts"]
    mix = card["drift_baseline"]["label_mix"]
    assert abs(sum(mix.values()) - 1) < 1e-9 and "abstained" in mix


def test_mixup_blends_images_and_pairs_each_with_its_partners_target():
    np.random.seed(0)
    x = torch.stack([torch.full((1, 4, 4), v, dtype=torch.uint8) for v in (0, 100, 200, 250)])
    y = torch.tensor([0, 1, 2, 3])
    mixed, partner, lam = mixup(x, y, alpha=0.4)
    assert mixed.dtype == torch.uint8 and 0 < lam < 1
    expected = (lam * x.float() + (1 - lam) * x[partner].float()).round()
    assert torch.equal(mixed.float(), expected)  # partner targets index the partner images
    assert sorted(partner.tolist()) == [0, 1, 2, 3]
    same, same_y, one = mixup(x, y, alpha=0.0)
    assert same is x and same_y is y and one == 1.0


def test_operating_point_is_the_highest_threshold_meeting_the_sensitivity():
    from orthovision.training.calibration import choose_operating_point

    classes = ["fracture", "non-affected"]
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1])
    p_frac = np.array([0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6, 0.5, 0.4, 0.1, 0.95, 0.3, 0.2, 0.1])
    probs = np.stack([p_frac, 1 - p_frac], 1)
    op = choose_operating_point(y, probs, classes, 0.90)
    assert op["threshold"] == pytest.approx(0.4)  # 9 of 10 fractures at >= 0.4
    assert op["val_sensitivity"] == pytest.approx(0.9)
    assert op["val_specificity"] == pytest.approx(0.75)
    assert choose_operating_point(y[:10], probs[:10], classes, 0.9) is None


def test_early_stopping_waits_for_min_epochs_then_patience():
    from orthovision.config import TrainConfig
    from orthovision.training.epochs import plateaued

    tc = TrainConfig(patience=2, min_epochs=4)
    best = {"a": {"epoch": 1}, "b": {"epoch": 2}}
    assert not plateaued(best, 3, tc)  # before min_epochs
    assert plateaued(best, 4, tc)  # 2 epochs since b improved
    assert not plateaued({"a": {"epoch": 3}}, 4, tc)


def test_fracture_only_data_leaves_tumour_classes_unvalidated(tmp_path: Path):
    fx = write_fracture_layout(tmp_path / "fx", groups_per_class=6, per_group=2)
    cfg = tiny_cfg(tmp_path, [{"kind": "fracture-xray", "path": str(fx)}], max_steps_per_epoch=1)
    card = load_checkpoint(train(cfg, tmp_path / "ckpt", progress=False)).card
    assert card["validated_classes"] == ["fracture", "non-affected"]
    assert any("tumor-benign" in note for note in card["notes"])
    assert any(note.startswith("No severity score") for note in card["notes"])


def test_resume_continues_where_it_stopped(tmp_path: Path, four_class_sources):
    cfg1 = tiny_cfg(tmp_path, four_class_sources, epochs=1, max_steps_per_epoch=1)
    data = prepare_data(cfg1)
    train(cfg1, tmp_path / "run", progress=False, data=data, evaluate_test=False)
    cfg2 = tiny_cfg(tmp_path, four_class_sources, epochs=2, max_steps_per_epoch=1)
    out = train(cfg2, tmp_path / "run", resume=True, progress=False, data=data, evaluate_test=False)
    card = load_checkpoint(out).card
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert card["training"]["resumed"] is True and card["training"]["epochs_run"] == 2


def test_same_seed_same_weights(tmp_path: Path, four_class_sources):
    cfg = tiny_cfg(tmp_path, four_class_sources, max_steps_per_epoch=1, calibrate_temperature=False)
    data = prepare_data(cfg)
    a = load_checkpoint(train(cfg, tmp_path / "a", progress=False, data=data, evaluate_test=False))
    b = load_checkpoint(train(cfg, tmp_path / "b", progress=False, data=data, evaluate_test=False))
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fit_temperature_recovers_a_known_scale():
    rng = np.random.default_rng(0)
    # Labels drawn from softmax(true): `true` is calibrated at T=1 by construction, so
    # after sharpening the logits 3x the fitted temperature should undo it.
    true = rng.normal(0, 1.5, (4000, 4))
    p = np.exp(true) / np.exp(true).sum(1, keepdims=True)
    targets = np.array([rng.choice(4, p=row) for row in p])
    logits = {"a": true * 3.0}
    t, before, after = fit_temperature(logits, np.array([1.0]), targets)
    assert 2.5 < t < 3.5 and after < before
    probs = fused_probabilities(logits, [1.0], t)
    assert probs.shape == (4000, 4)


def test_compare_runs_each_backbone_under_one_budget(
    tmp_path: Path, four_class_sources, monkeypatch
):
    # The recipe's per-branch settings follow the branch the config names for that backbone.
    cfg = tiny_cfg(
        tmp_path,
        four_class_sources,
        max_steps_per_epoch=1,
        branch_lr={"resnet18": 3e-3},
        frozen_prefixes=["branches.efficientnet_b0.conv_stem"],
    )
    rows = compare_backbones(cfg, ["test_efficientnet", "test_resnet"], tmp_path / "cmp")
    assert [r["backbone"] for r in rows] == ["test_efficientnet", "test_resnet"]
    assert all(0 <= r["val_macro_f1"] <= 1 and r["initial_weights"] == "none" for r in rows)
    assert all(0 <= r["val_auc"] <= 1 for r in rows)
    assert [r["lr"] for r in rows] == [cfg.train.lr, 3e-3]
    assert [r["frozen"] for r in rows] == [["branches.efficientnet_b0.conv_stem"], []]
    assert (tmp_path / "cmp" / "compare.json").is_file()

    # Resumable: finished rows are read back, nothing trains again.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished backbone was trained again")

    monkeypatch.setattr("orthovision.training.compare.train", no_training)
    again = compare_backbones(cfg, ["test_efficientnet", "test_resnet"], tmp_path / "cmp")
    assert again == rows


@pytest.mark.slow
@requires_shared
def test_shared_fracture_set_and_btxrd_train_into_four_classes(tmp_path: Path):
    """Done-when of issue 4: the real fracture set + a BTXRD-shaped folder, 1 epoch."""
    rows = btxrd_rows()
    rows = [{**r, "image_id": f"{i}-{r['image_id']}"} for i in range(4) for r in rows]
    bt = write_btxrd_layout(tmp_path / "bt", rows)
    sources = [
        {"kind": "fracture-xray", "path": str(SHARED / "fracture-xray")},
        {"kind": "btxrd", "path": str(bt)},
    ]
    cfg = tiny_cfg(tmp_path, sources, max_steps_per_epoch=None, batch_size=32)
    card = load_checkpoint(train(cfg, tmp_path / "ckpt", progress=False)).card
    assert card["data"]["cleaning"]["by_reason"] == {"unsupported_format": 1}
    assert {"fracture", "non-affected"} <= set(card["validated_classes"])
    assert len(card["classes"]) == 4
