"""The training passes: one `Run` holds the model, optimiser, EMA, best states and history;
`run_epoch` trains one pass and `validate` scores it and keeps each tracked model's best
state. `save_state` / `Run.resume` make a hard stop lose at most the pass in progress.
"""

from __future__ import annotations

import json
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from orthovision.config import OrthoVisionConfig
from orthovision.datasets.loading import PreparedData, balanced_sampler, class_weights
from orthovision.evaluation.metrics import selection_metrics
from orthovision.evaluation.run import predict_logits
from orthovision.model.backbones import Ensemble, build_ensemble
from orthovision.model.probabilities import fused_probabilities, softmax
from orthovision.training.calibration import fused_log_probs, weighted_nll
from orthovision.training.optim import WeightEMA, build_optimizer, clip_gradients, lr_factor

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(device: torch.device, enabled: bool):
    # bfloat16 needs no GradScaler; CPU autocast is slower than float32 on most CPUs.
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def plateaued(best: dict[str, dict], epoch: int, tc) -> bool:
    """True when `epoch` passes are done and no tracked model improved in `patience`."""
    if tc.patience is None or not best or epoch < tc.min_epochs:
        return False
    return epoch - max(b["epoch"] for b in best.values()) >= tc.patience


@dataclass
class Run:
    """Everything one training run carries from pass to pass."""

    cfg: OrthoVisionConfig
    data: PreparedData
    device: torch.device
    model: Ensemble
    optimizer: torch.optim.Optimizer
    ema: WeightEMA | None
    frozen: list[str]
    loss_weight: torch.Tensor | None
    # Best states: per branch in the paper's mode, the whole ensemble ("fused") when joint.
    best: dict[str, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def branch_mode(self) -> bool:
        return self.cfg.train.mode == "branches-then-ensemble"

    @property
    def use_amp(self) -> bool:
        return self.cfg.train.amp and self.device.type == "cuda"

    @property
    def scored(self) -> Ensemble:
        """The weights validation, selection and the checkpoint use (the EMA when on)."""
        return self.ema.module if self.ema is not None else self.model

    @classmethod
    def start(cls, cfg: OrthoVisionConfig, data: PreparedData, device: torch.device) -> Run:
        tc = cfg.train
        model = build_ensemble(cfg.model).to(device)
        if tc.channels_last:
            model.to(memory_format=torch.channels_last)
            model.channels_last = True
        prefixes = tc.frozen_prefixes or ("\0",)
        frozen = [n for n, _ in model.named_parameters() if n.startswith(prefixes)]
        if tc.frozen_prefixes and not frozen:
            raise ValueError(f"frozen_prefixes {tc.frozen_prefixes} match no parameter")
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)
        if tc.mode == "branches-then-ensemble":
            # The fusion weights stay at their initial values until the branches are done.
            model.fusion_params.requires_grad_(False)
        n_classes = len(cfg.model.classes)
        weight = class_weights(data.targets("train"), n_classes) if tc.class_weighted_loss else None
        return cls(
            cfg=cfg,
            data=data,
            device=device,
            model=model,
            optimizer=build_optimizer(model, tc),
            ema=WeightEMA(model, tc.ema_decay) if tc.ema_decay else None,
            frozen=frozen,
            loss_weight=weight,
        )

    def resume(self, state_path: Path) -> None:
        """Continue from the last completed pass saved by `save_state`."""
        state = torch.load(state_path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
            self.ema.updates = int(state.get("ema_updates", 0))
        self.best = state["best"]
        self.history = json.loads(state["history"])
        self.start_epoch = int(state["epoch"])
        log.info("resumed from %s at epoch %d", state_path, self.start_epoch)

    def should_stop(self, epoch: int) -> bool:
        """The wall-time budget (another pass would overrun it) or early stopping."""
        tc = self.cfg.train
        elapsed = time.monotonic() - self.started
        last = self.history[-1]["epoch_time_s"] if len(self.history) > self.start_epoch else 0.0
        if tc.max_train_time_s is not None and elapsed + last > tc.max_train_time_s:
            log.info("time budget reached after %d epochs (%.0f s)", epoch, elapsed)
            return True
        if plateaued(self.best, epoch, tc):
            log.info(
                "early stop: no validation %s gain in %d epochs", tc.selection_metric, tc.patience
            )
            return True
        return False

    def save_state(self, state_path: Path) -> None:
        ema = (
            {"ema": self.ema.module.state_dict(), "ema_updates": self.ema.updates}
            if self.ema is not None
            else {}
        )
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best": self.best,
            "history": json.dumps(self.history),
            "epoch": len(self.history),
            **ema,
        }
        torch.save(state, state_path)

    def restore_best(self) -> None:
        """Each tracked model's best pass back into the model, ready for fusion."""
        if self.branch_mode:
            for n in self.model.branch_names:
                if n in self.best:
                    self.model.branches[n].load_state_dict(self.best[n]["state"])
        elif "fused" in self.best:
            self.model.load_state_dict(self.best["fused"]["state"])
        self.model.eval()
        self.model.channels_last = False  # a serving choice, not a property of the checkpoint

    def best_val_logits(self) -> dict[str, np.ndarray]:
        """Validation logits of the restored model: kept with each best state, so no second
        validation pass after training."""
        names = self.model.branch_names
        stored = {
            n: b["val_logits"][n] for b in self.best.values() for n in b.get("val_logits", {})
        }
        if set(stored) == set(names):
            return {n: stored[n].numpy() for n in names}
        val_px = self.data.pixels[self.data.indices("val")]
        return predict_logits(self.model, val_px, self.cfg.train.eval_batch_size, self.device)


def mixup(
    x_uint8: torch.Tensor, y: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(blended uint8 batch, the partner targets, lambda); lambda 1 and no change when off.

    Blending stays in uint8 (rounding costs < 0.5/255), so the model input path is the
    one serving uses. Draws from numpy's global generator, seeded per epoch.
    """
    if alpha <= 0 or len(y) < 2:
        return x_uint8, y, 1.0
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.from_numpy(np.random.permutation(len(y))).to(y.device)
    mixed = lam * x_uint8.float() + (1 - lam) * x_uint8[perm.to(x_uint8.device)].float()
    return mixed.round_().clamp_(0, 255).to(torch.uint8), y[perm], lam


def _loss(
    run: Run, out: dict[str, torch.Tensor], y: torch.Tensor, w: torch.Tensor | None
) -> torch.Tensor:
    """Branch mode: the sum of each branch's own loss; joint: the fused NLL."""
    if run.branch_mode:
        smoothing = run.cfg.train.label_smoothing
        return sum(
            nn.functional.cross_entropy(o.float(), y, weight=w, label_smoothing=smoothing)
            for o in out.values()
        )
    return weighted_nll(fused_log_probs(run.model, out), y, w)


def run_epoch(run: Run, epoch: int, progress: bool) -> dict:
    """One pass over the training split; returns the pass's training figures."""
    from tqdm import tqdm

    tc, model, names = run.cfg.train, run.model, run.model.branch_names
    transform = None
    if tc.augment:
        from orthovision.training.augment import train_augmentation

        transform = train_augmentation(run.cfg.preprocess.image_size, tc.augmentation)
    train_ds = run.data.dataset("train", transform)
    # Seeding per epoch makes a resumed run draw what an uninterrupted one would.
    seed_everything(tc.seed + epoch)
    targets = run.data.targets("train")
    groups = run.data.groups("train") if tc.group_balanced else None
    sampler = balanced_sampler(targets, tc.seed + epoch, groups) if tc.weighted_sampler else None
    loader = DataLoader(
        train_ds,
        batch_size=tc.batch_size,
        sampler=sampler,
        shuffle=sampler is None,
        num_workers=tc.num_workers,
        drop_last=len(train_ds) > tc.batch_size,
        pin_memory=run.device.type == "cuda",
        generator=torch.Generator().manual_seed(tc.seed + epoch),
    )
    steps = (
        len(loader) if tc.max_steps_per_epoch is None else min(len(loader), tc.max_steps_per_epoch)
    )
    w = None if run.loss_weight is None else run.loss_weight.to(run.device)
    model.train()
    t0 = time.monotonic()
    seen = correct = 0
    loss_sum = 0.0
    bar = tqdm(
        total=steps, desc=f"epoch {epoch + 1}/{tc.epochs}", disable=not progress, mininterval=2
    )
    for step, (x, y) in enumerate(loader):
        budget = tc.max_train_time_s
        if step >= steps or (budget is not None and time.monotonic() - run.started > budget):
            break  # at the budget the partial pass is still validated and can be the best
        y = y.to(run.device, non_blocking=True)
        x, y_mix, lam = mixup(x, y, tc.mixup_alpha)
        with _autocast(run.device, run.use_amp):
            out = {n: model.branch_forward(n, x) for n in names}
        loss = _loss(run, out, y, w)
        if lam < 1.0:
            loss = lam * loss + (1 - lam) * _loss(run, out, y_mix, w)
        factor = lr_factor(epoch * steps + step, steps, tc)
        for group in run.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.branch_mode:  # apart: one clipping norm per branch
            for n in names:
                clip_gradients(model.branches[n].parameters(), tc.grad_clip_norm)
        else:
            clip_gradients(model.parameters(), tc.grad_clip_norm)
        run.optimizer.step()
        if run.ema is not None:
            run.ema.update(model)
        with torch.no_grad():
            pred = fused_log_probs(model, out).argmax(-1)
        seen += len(y)
        correct += int((pred == y).sum())
        loss_sum += float(loss.detach()) * len(y) / (len(names) if run.branch_mode else 1)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
    bar.close()
    train_s = time.monotonic() - t0
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "train_images": seen,
        "train_time_s": train_s,
        "train_img_per_s": seen / train_s if train_s > 0 else None,
        "lr_factor": lr_factor((epoch + 1) * steps - 1, steps, tc),
        "started": t0,
    }


def validate(run: Run, record: dict) -> dict:
    """Score the pass on the validation split, keep each tracked model's best state, log
    one line and append the pass to the history."""
    tc, classes, names = run.cfg.train, list(run.cfg.model.classes), run.model.branch_names
    scored = run.scored
    val_px = run.data.pixels[run.data.indices("val")]
    val_targets = np.asarray(run.data.targets("val"), dtype=np.int64)
    val_logits = predict_logits(scored, val_px, tc.eval_batch_size, run.device)
    fw = scored.fusion_weights.cpu().numpy()
    record["val"] = {
        "fused": selection_metrics(val_targets, fused_probabilities(val_logits, fw, 1.0), classes),
        **{n: selection_metrics(val_targets, softmax(val_logits[n]), classes) for n in names},
    }
    for key in names if run.branch_mode else ["fused"]:
        score = record["val"][key][tc.selection_metric]
        if key in run.best and score <= run.best[key]["score"]:
            continue
        sub = scored.branches[key] if run.branch_mode else scored
        run.best[key] = {
            "score": score,
            "metric": tc.selection_metric,
            "macro_f1": record["val"][key]["macro_f1"],
            "accuracy": record["val"][key]["accuracy"],
            "epoch": record["epoch"],
            "state": {k: v.detach().cpu().clone() for k, v in sub.state_dict().items()},
            # The best state's validation logits: no second pass after training.
            "val_logits": {
                n: torch.from_numpy(val_logits[n])
                for n in (names if not run.branch_mode else [key])
            },
        }
    record["epoch_time_s"] = time.monotonic() - record.pop("started")
    run.history.append(record)
    log.info(
        "epoch %d: loss %.4f acc %.3f | val AUC %s | val macro-F1 %s | %.1f img/s, %.0f s",
        record["epoch"],
        record["train_loss"],
        record["train_accuracy"],
        {k: round(v["auc"], 4) for k, v in record["val"].items()},
        {k: round(v["macro_f1"], 4) for k, v in record["val"].items()},
        record["train_img_per_s"] or 0.0,
        record["epoch_time_s"],
    )
    return record
