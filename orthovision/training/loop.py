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

After training, temperature scaling is fitted on the validation split (minimum NLL) and
the held-out test split is evaluated once, for the card.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from orthovision.config import OrthoVisionConfig
from orthovision.datasets.loading import PreparedData, balanced_sampler, class_weights, prepare_data
from orthovision.datasets.splits import write_split_csv
from orthovision.evaluation.metrics import at_threshold, selection_metrics
from orthovision.evaluation.results import compute_report
from orthovision.evaluation.run import predict_logits
from orthovision.model.backbones import build_ensemble
from orthovision.model.checkpoint import CARD_FILE, load_checkpoint, save_checkpoint
from orthovision.model.probabilities import fused_probabilities
from orthovision.safety.fitting import attach_safety
from orthovision.training.augment import train_augmentation
from orthovision.training.calibration import (
    choose_operating_point,
    fit_fusion_weights,
    fit_temperature,
    fused_log_probs,
    weighted_nll,
)
from orthovision.training.optim import WeightEMA, build_optimizer, clip_gradients, lr_factor

log = logging.getLogger(__name__)


CONFIG_FILE = "config.yaml"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"
SPLITS_FILE = "splits.csv"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(device: torch.device, enabled: bool):
    # bfloat16 needs no GradScaler; CPU autocast is slower than float32 on most CPUs.
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _save_resolved_config(cfg: OrthoVisionConfig, out_dir: Path) -> None:
    (out_dir / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def _over_budget(started: float, budget_s: float | None) -> bool:
    return budget_s is not None and time.monotonic() - started > budget_s


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
    from tqdm import tqdm

    tc = cfg.train
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tc.num_threads:
        torch.set_num_threads(tc.num_threads)
    device = resolve_device(tc.device)
    use_amp = tc.amp and device.type == "cuda"
    seed_everything(tc.seed)

    if data is None:
        data = prepare_data(cfg, progress=progress)
    _save_resolved_config(cfg, out_dir)
    write_split_csv(data.split_rows(), out_dir / SPLITS_FILE)
    classes = list(cfg.model.classes)
    train_targets = data.targets("train")
    if not train_targets:
        raise ValueError("the training split is empty")
    val_idx = data.indices("val")
    val_targets = np.asarray(data.targets("val"), dtype=np.int64)
    loss_weight = class_weights(train_targets, len(classes)) if tc.class_weighted_loss else None

    model = build_ensemble(cfg.model).to(device)
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
        model.channels_last = True
    branch_names = model.branch_names
    frozen = [n for n, p in model.named_parameters() if n.startswith(tc.frozen_prefixes or ("\0",))]
    if tc.frozen_prefixes and not frozen:
        raise ValueError(f"frozen_prefixes {tc.frozen_prefixes} match no parameter")
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    branch_mode = tc.mode == "branches-then-ensemble"
    if branch_mode:
        # The fusion weights stay at their initial values until the branches are done.
        model.fusion_params.requires_grad_(False)
    opt = build_optimizer(model, tc)
    ema = WeightEMA(model, tc.ema_decay) if tc.ema_decay else None
    metric = tc.selection_metric

    # Best states: per branch in the paper's mode, the whole ensemble when joint.
    best: dict[str, dict] = {}
    history: list[dict] = []
    start_epoch = 0
    state_path = out_dir / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
            ema.updates = int(state.get("ema_updates", 0))
        best = state["best"]
        history = json.loads(state["history"])
        start_epoch = int(state["epoch"])
        log.info("resumed from %s at epoch %d", state_path, start_epoch)

    transform = None
    if tc.augment:
        transform = train_augmentation(cfg.preprocess.image_size, tc.augmentation)
    train_ds = data.dataset("train", transform)
    w = None if loss_weight is None else loss_weight.to(device)
    started = time.monotonic()
    last_epoch_s = 0.0
    for epoch in range(start_epoch, tc.epochs):
        elapsed = time.monotonic() - started
        if tc.max_train_time_s is not None and elapsed + last_epoch_s > tc.max_train_time_s:
            log.info("time budget reached after %d epochs (%.0f s)", epoch, elapsed)
            break
        if _plateaued(best, epoch, tc):
            log.info("early stop: no validation %s gain in %d epochs", metric, tc.patience)
            break
        # Seeding per epoch makes a resumed run draw what an uninterrupted one would.
        seed_everything(tc.seed + epoch)
        sampler = balanced_sampler(train_targets, tc.seed + epoch) if tc.weighted_sampler else None
        loader = DataLoader(
            train_ds,
            batch_size=tc.batch_size,
            sampler=sampler,
            shuffle=sampler is None,
            num_workers=tc.num_workers,
            drop_last=len(train_ds) > tc.batch_size,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(tc.seed + epoch),
        )
        model.train()
        t0 = time.monotonic()
        seen = correct = 0
        loss_sum = 0.0
        steps = (
            len(loader)
            if tc.max_steps_per_epoch is None
            else min(len(loader), tc.max_steps_per_epoch)
        )
        bar = tqdm(
            total=steps, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress, mininterval=2
        )
        for step, (x, y) in enumerate(loader):
            if step >= steps or _over_budget(started, tc.max_train_time_s):
                # At the budget the partial epoch is still validated and can be the best.
                break
            y = y.to(device, non_blocking=True)
            with _autocast(device, use_amp):
                out = {n: model.branch_forward(n, x) for n in branch_names}
            if branch_mode:
                losses = {
                    n: nn.functional.cross_entropy(
                        out[n].float(), y, weight=w, label_smoothing=tc.label_smoothing
                    )
                    for n in out
                }
                loss = sum(losses.values())
            else:
                loss = weighted_nll(fused_log_probs(model, out), y, w)
            factor = lr_factor(epoch * steps + step, steps, tc)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if branch_mode:  # apart: one clipping norm per branch
                for n in branch_names:
                    clip_gradients(model.branches[n].parameters(), tc.grad_clip_norm)
            else:
                clip_gradients(model.parameters(), tc.grad_clip_norm)
            opt.step()
            if ema is not None:
                ema.update(model)
            with torch.no_grad():
                pred = fused_log_probs(model, out).argmax(-1)
            seen += len(y)
            correct += int((pred == y).sum())
            loss_sum += float(loss.detach()) * len(y) / (len(branch_names) if branch_mode else 1)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
        bar.close()
        train_s = time.monotonic() - t0

        scored = ema.module if ema is not None else model
        val_logits = predict_logits(scored, data.pixels[val_idx], tc.eval_batch_size, device)
        fw = scored.fusion_weights.cpu().numpy()
        record = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(seen, 1),
            "train_accuracy": correct / max(seen, 1),
            "train_images": seen,
            "train_time_s": train_s,
            "train_img_per_s": seen / train_s if train_s > 0 else None,
            "lr_factor": lr_factor((epoch + 1) * steps - 1, steps, tc),
            "val": {
                "fused": selection_metrics(
                    val_targets, fused_probabilities(val_logits, fw, 1.0), classes
                ),
                **{
                    n: selection_metrics(val_targets, _softmax(val_logits[n]), classes)
                    for n in branch_names
                },
            },
        }
        keys = branch_names if branch_mode else ["fused"]
        for key in keys:
            score = record["val"][key][metric]
            if key not in best or score > best[key]["score"]:
                sub = scored.branches[key] if branch_mode else scored
                best[key] = {
                    "score": score,
                    "metric": metric,
                    "macro_f1": record["val"][key]["macro_f1"],
                    "accuracy": record["val"][key]["accuracy"],
                    "epoch": epoch + 1,
                    "state": {k: v.detach().cpu().clone() for k, v in sub.state_dict().items()},
                    # The best state's validation logits: no second pass after training.
                    "val_logits": {
                        n: torch.from_numpy(val_logits[n])
                        for n in (branch_names if not branch_mode else [key])
                    },
                }
        record["epoch_time_s"] = time.monotonic() - t0
        last_epoch_s = record["epoch_time_s"]
        history.append(record)
        log.info(
            "epoch %d: loss %.4f acc %.3f | val AUC %s | val macro-F1 %s | %.1f img/s, %.0f s",
            epoch + 1,
            record["train_loss"],
            record["train_accuracy"],
            {k: round(record["val"][k]["auc"], 4) for k in record["val"]},
            {k: round(record["val"][k]["macro_f1"], 4) for k in record["val"]},
            record["train_img_per_s"] or 0.0,
            record["epoch_time_s"],
        )
        (out_dir / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "best": best,
                "history": json.dumps(history),
                "epoch": epoch + 1,
                **(
                    {"ema": ema.module.state_dict(), "ema_updates": ema.updates}
                    if ema is not None
                    else {}
                ),
            },
            state_path,
        )
    train_wall_s = time.monotonic() - started

    # Best epochs back in.
    if branch_mode:
        for n in branch_names:
            if n in best:
                model.branches[n].load_state_dict(best[n]["state"])
    elif "fused" in best:
        model.load_state_dict(best["fused"]["state"])
    model.eval()
    model.channels_last = False  # a serving choice, not a property of the checkpoint

    # Fusion weights on frozen branches (paper's second stage).
    stored = {n: b["val_logits"][n] for b in best.values() for n in b.get("val_logits", {})}
    if set(stored) == set(branch_names):
        val_logits = {n: stored[n].numpy() for n in branch_names}
    else:
        val_logits = predict_logits(model, data.pixels[val_idx], tc.eval_batch_size, device)
    fusion_record: dict = {"fitted_on": None, "init": list(cfg.model.fusion_init)}
    if branch_mode and tc.fusion_epochs > 0:
        model.fusion_params.requires_grad_(True)
        if tc.fusion_fit_split == "val":
            fit_logits, fit_targets = val_logits, val_targets
        else:
            fit_idx = data.indices("train")
            fit_logits = predict_logits(model, data.pixels[fit_idx], tc.eval_batch_size, device)
            fit_targets = np.asarray(train_targets, dtype=np.int64)
        if len(fit_targets):
            losses = fit_fusion_weights(
                model, fit_logits, fit_targets, loss_weight, tc.fusion_epochs, tc.fusion_lr
            )
            fusion_record.update(
                {"fitted_on": tc.fusion_fit_split, "nll_start": losses[0], "nll_end": losses[-1]}
            )
        model.fusion_params.requires_grad_(False)
    fw = model.fusion_weights.cpu().numpy()
    fusion_record["weights"] = dict(zip(branch_names, fw.tolist(), strict=True))

    # Temperature scaling on the validation split.
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
    temperature = float(model.temperature)

    val_probs = fused_probabilities(val_logits, fw, temperature)
    operating_point = choose_operating_point(val_targets, val_probs, classes, tc.target_sensitivity)
    validation = {
        "fused": selection_metrics(val_targets, val_probs, classes),
        **{
            n: selection_metrics(val_targets, _softmax(val_logits[n]), classes)
            for n in branch_names
        },
    }
    validated = [c for c in data.classes_with_data("train") if c in data.classes_with_data("val")]

    throughputs = [h["train_img_per_s"] for h in history if h.get("train_img_per_s")]
    training = {
        "mode": tc.mode,
        "device": str(device),
        "amp": use_amp,
        "epochs_run": len(history),
        "epochs_configured": tc.epochs,
        "best_epochs": {k: v["epoch"] for k, v in best.items()},
        "wall_time_s": round(train_wall_s, 1),
        "train_img_per_s": round(float(np.median(throughputs)), 2) if throughputs else None,
        "backbones": {
            b.name: {"timm_name": b.timm_name, "initial_weights": b.pretrained}
            for b in cfg.model.backbones
        },
        "frozen_prefixes": list(tc.frozen_prefixes),
        "frozen_parameters": int(
            sum(p.numel() for n, p in model.named_parameters() if n in frozen)
        ),
        "recipe": {
            k: tc.model_dump(mode="json")[k]
            for k in (
                "optimizer",
                "lr",
                "branch_lr",
                "weight_decay",
                "schedule",
                "warmup_epochs",
                "label_smoothing",
                "ema_decay",
                "augmentation",
                "selection_metric",
                "patience",
                "min_epochs",
                "batch_size",
                "grad_clip_norm",
            )
        },
        "fusion": fusion_record,
        "calibration": calibration,
        "operating_point": operating_point,
        "validation": validation,
        "resumed": bool(resume and start_epoch),
    }
    data_summary = data.summary()
    save_checkpoint(
        model,
        cfg,
        out_dir,
        validated_classes=validated,
        trained=True,
        data=data_summary,
        metrics={},
    )
    # The held-out test split, once, on the weights exactly as stored (float16 convs).
    metrics: dict = {}
    test_idx = data.indices("test")
    stored_model = load_checkpoint(out_dir).model
    if evaluate_test and test_idx:
        test_logits = predict_logits(stored_model, data.pixels[test_idx], tc.eval_batch_size)
        report = compute_report(
            test_logits,
            np.asarray(data.targets("test"), dtype=np.int64),
            [data.samples[i].group for i in test_idx],
            classes,
            fusion_weights=stored_model.fusion_weights.numpy(),
            temperature=float(stored_model.temperature),
            branch_val_accuracy={n: validation[n]["accuracy"] for n in branch_names},
            abstain_threshold=cfg.fusion.abstain_threshold,
            n_bootstrap=tc.bootstrap_samples,
            seed=tc.seed,
        )
        metrics = {"split": "test", **report.card_metrics()}
        if operating_point is not None:
            k = classes.index("fracture")
            test_y = np.asarray(data.targets("test"), dtype=np.int64)
            test_p = fused_probabilities(
                test_logits, stored_model.fusion_weights.numpy(), float(stored_model.temperature)
            )
            metrics["operating_point"] = at_threshold(test_y == k, test_p[:, k], operating_point)
    # The card has no slot for the training record; add it beside the others (the card's
    # integrity check covers the weights, not the card text).
    card_path = out_dir / CARD_FILE
    card = json.loads(card_path.read_text())
    card["training"] = training
    if operating_point is not None:
        card["operating_point"] = operating_point
    # "Not for me": the OOD detector on this model's features, scope, drift baseline.
    card = attach_safety(
        card,
        stored_model,
        data.pixels[data.indices("train")],
        train_targets,
        data.pixels[val_idx],
        out_dir,
    )
    card["metrics"] = metrics
    card["notes"] = card_notes(cfg, validated)
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    log.info("wrote %s (validated classes %s)", out_dir, validated)
    return out_dir


def _plateaued(best: dict[str, dict], epoch: int, tc) -> bool:
    """True when `epoch` epochs are done and no tracked model improved in `patience`."""
    if tc.patience is None or not best or epoch < tc.min_epochs:
        return False
    return epoch - max(b["epoch"] for b in best.values()) >= tc.patience


def card_notes(cfg: OrthoVisionConfig, validated: list[str]) -> list[str]:
    notes = []
    unvalidated = [c for c in cfg.model.classes if c not in validated]
    if unvalidated:
        notes.append(
            f"No training and validation data for {unvalidated}: those outputs are not "
            "validated and the service abstains when one of them is the top class."
        )
    for b in cfg.model.backbones:
        if b.timm_name != b.name:
            notes.append(f"Branch {b.name!r} is timm {b.timm_name!r}.")
        if b.timm_name == "tf_efficientnet_lite0":
            notes.append(
                "The EfficientNet branch is EfficientNet-Lite0 (ImageNet initialised), not the "
                "paper's EfficientNet-B0: only Lite0 ImageNet weights are available offline."
            )
        if b.pretrained == "none":
            notes.append(f"Branch {b.name!r} was trained from random initialisation.")
    notes.append(
        "Not for: anatomy outside the training data (the service abstains on chest, abdomen, "
        "head and similar from the DICOM header, and on images far from the training data "
        "by the OOD score), children's growing skeletons (ages are not recorded in the data), "
        "tumour diagnosis, or use without a qualified reader."
    )
    return notes


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def copy_config(cfg: OrthoVisionConfig, **train_updates: object) -> OrthoVisionConfig:
    """cfg with some `train` fields replaced (validated)."""
    train_cfg = type(cfg.train).model_validate({**cfg.train.model_dump(), **train_updates})
    return cfg.model_copy(update={"train": train_cfg})
