"""`train(cfg, out_dir) -> Path`: the paper's training, reproducible and leak-free.

Paper 4.4-4.5: Adam, lr 1e-4, batch 32, gradient clipping, class-balanced sampling and
loss, augmentation; the best epoch by validation macro-F1 (accuracy recorded too). Two
modes, recorded in the model card:

- "branches-then-ensemble" (the paper's order): every branch minimises its own
  class-weighted cross-entropy and keeps its own best epoch; then, on frozen branches,
  the fusion weights minimise the class-weighted NLL of the fused probabilities.
  The branches' parameters are disjoint and Adam is per-parameter, so one data pass trains
  them apart exactly (clipping is per branch too) at the cost of one decode.
- "joint": one loss, the class-weighted NLL of log(fused probabilities), through every
  parameter including the fusion weights.

Phases: passes (training/epochs.py) -> best passes restored -> fusion weights and
temperature on the validation split (training/calibration.py) -> the held-out test split
once, the OOD detector, and the card written once (training/card.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from orthovision.config import OrthoVisionConfig
from orthovision.datasets.loading import PreparedData, prepare_data
from orthovision.datasets.splits import write_split_csv
from orthovision.evaluation.metrics import selection_metrics
from orthovision.evaluation.run import predict_logits
from orthovision.model.checkpoint import as_stored, save_checkpoint
from orthovision.model.device import resolve_device
from orthovision.model.probabilities import fused_probabilities, softmax
from orthovision.safety.fitting import attach_safety
from orthovision.training.calibration import (
    choose_operating_point,
    fit_fusion_weights,
    fit_temperature,
)
from orthovision.training.card import card_notes, held_out_metrics, training_record
from orthovision.training.epochs import HISTORY_FILE, STATE_FILE, Run, run_epoch, seed_everything
from orthovision.training.epochs import validate as validate_epoch

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
SPLITS_FILE = "splits.csv"

__all__ = ["CONFIG_FILE", "HISTORY_FILE", "SPLITS_FILE", "STATE_FILE", "copy_config", "train"]


def train(
    cfg: OrthoVisionConfig,
    out_dir: Path | str,
    *,
    resume: bool = False,
    data: PreparedData | None = None,
    progress: bool = True,
    evaluate_test: bool = True,
) -> Path:
    """Train, select, fuse, calibrate, test; write a checkpoint folder and return its path.

    `out_dir` receives model.safetensors + model_card.json, config.yaml (the resolved
    config), history.json, splits.csv and train_state.pt (for `resume`).
    """
    import json

    tc = cfg.train
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    seed_everything(tc.seed)
    data = data if data is not None else prepare_data(cfg, progress=progress)
    if not data.targets("train"):
        raise ValueError("the training split is empty")
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_split_csv(data.split_rows(), out_dir / SPLITS_FILE)

    run = Run.start(cfg, data, resolve_device(tc.device))
    if resume and (out_dir / STATE_FILE).is_file():
        run.resume(out_dir / STATE_FILE)
    run.started = time.monotonic()
    for epoch in range(run.start_epoch, tc.epochs):
        if run.should_stop(epoch):
            break
        validate_epoch(run, run_epoch(run, epoch, progress))
        (out_dir / HISTORY_FILE).write_text(json.dumps(run.history, indent=1) + "\n")
        run.save_state(out_dir / STATE_FILE)
    wall_s = time.monotonic() - run.started

    run.restore_best()
    fusion, calibration, val_logits = fuse_and_calibrate(run)
    write_card(run, out_dir, wall_s, fusion, calibration, val_logits, evaluate_test)
    log.info("wrote %s", out_dir)
    return out_dir


def fuse_and_calibrate(run: Run) -> tuple[dict, dict, dict[str, np.ndarray]]:
    """The paper's second stage (fusion weights on frozen branches), then temperature
    scaling on the validation split. Returns the fusion and calibration records and the
    validation logits."""
    tc, model, data = run.cfg.train, run.model, run.data
    val_logits = run.best_val_logits()
    val_targets = np.asarray(data.targets("val"), dtype=np.int64)
    fusion: dict = {"fitted_on": None, "init": list(run.cfg.model.fusion_init)}
    if run.branch_mode and tc.fusion_epochs > 0:
        model.fusion_params.requires_grad_(True)
        if tc.fusion_fit_split == "val":
            fit_logits, fit_targets = val_logits, val_targets
        else:
            fit_px = data.pixels[data.indices("train")]
            fit_logits = predict_logits(model, fit_px, tc.eval_batch_size, run.device)
            fit_targets = np.asarray(data.targets("train"), dtype=np.int64)
        if len(fit_targets):
            losses = fit_fusion_weights(
                model, fit_logits, fit_targets, run.loss_weight, tc.fusion_epochs, tc.fusion_lr
            )
            fusion.update(
                {"fitted_on": tc.fusion_fit_split, "nll_start": losses[0], "nll_end": losses[-1]}
            )
        model.fusion_params.requires_grad_(False)
    fw = model.fusion_weights.cpu().numpy()
    fusion["weights"] = dict(zip(model.branch_names, fw.tolist(), strict=True))

    calibration: dict = {"fitted": False, "temperature": 1.0}
    if tc.calibrate_temperature and len(val_targets):
        t, nll_before, nll_after = fit_temperature(val_logits, fw, val_targets)
        model.temperature.fill_(t)
        calibration = {
            "fitted": True,
            "split": "val",
            "temperature": t,
            "val_nll_t1": nll_before,
            "val_nll_calibrated": nll_after,
        }
    return fusion, calibration, val_logits


def write_card(
    run: Run,
    out_dir: Path,
    wall_s: float,
    fusion: dict,
    calibration: dict,
    val_logits: dict[str, np.ndarray],
    evaluate_test: bool,
) -> None:
    """Operating point, test metrics and safety on the stored weights; weights and card
    written once."""
    cfg, data, model = run.cfg, run.data, run.model
    classes = list(cfg.model.classes)
    val_targets = np.asarray(data.targets("val"), dtype=np.int64)
    val_probs = fused_probabilities(
        val_logits, model.fusion_weights.cpu().numpy(), float(model.temperature)
    )
    op = choose_operating_point(val_targets, val_probs, classes, cfg.train.target_sensitivity)
    validation = {
        "fused": selection_metrics(val_targets, val_probs, classes),
        **{
            n: selection_metrics(val_targets, softmax(val_logits[n]), classes)
            for n in model.branch_names
        },
    }
    validated = [c for c in data.classes_with_data("train") if c in data.classes_with_data("val")]
    training = training_record(run, wall_s, fusion, calibration, validation)
    training["operating_point"] = op
    stored = as_stored(model)
    metrics = held_out_metrics(cfg, data, stored, validation, op) if evaluate_test else {}
    card = {
        "classes": classes,
        "validated_classes": validated,
        "data": data.summary(),
        "training": training,
        **({"operating_point": op} if op is not None else {}),
    }
    # "Not for me": the OOD detector on this model's features, scope, drift baseline.
    train_px, val_px = data.pixels[data.indices("train")], data.pixels[data.indices("val")]
    card = attach_safety(card, stored, train_px, data.targets("train"), val_px, out_dir)
    extra = {k: card[k] for k in card if k not in ("classes", "validated_classes", "data")}
    extra["notes"] = card_notes(cfg, validated)
    save_checkpoint(
        model,
        cfg,
        out_dir,
        validated_classes=validated,
        trained=True,
        data=card["data"],
        metrics=metrics,
        extra=extra,
    )


def copy_config(cfg: OrthoVisionConfig, **train_updates: object) -> OrthoVisionConfig:
    """cfg with some `train` fields replaced (validated)."""
    train_cfg = type(cfg.train).model_validate({**cfg.train.model_dump(), **train_updates})
    return cfg.model_copy(update={"train": train_cfg})
