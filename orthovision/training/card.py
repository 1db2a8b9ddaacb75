"""What a finished run writes into its model card: the training record, the held-out test
metrics (on the weights exactly as stored) and the notes on what the model is not for.
"""

from __future__ import annotations

import numpy as np

from orthovision.config import OrthoVisionConfig
from orthovision.datasets.loading import PreparedData
from orthovision.evaluation.metrics import at_threshold
from orthovision.evaluation.results import compute_report
from orthovision.evaluation.run import predict_logits
from orthovision.model.backbones import Ensemble
from orthovision.model.probabilities import fused_probabilities

# TrainConfig fields the card records as "the recipe".
RECIPE_KEYS = (
    "optimizer",
    "lr",
    "branch_lr",
    "weight_decay",
    "schedule",
    "warmup_epochs",
    "label_smoothing",
    "ema_decay",
    "augmentation",
    "group_balanced",
    "mixup_alpha",
    "selection_metric",
    "patience",
    "min_epochs",
    "batch_size",
    "grad_clip_norm",
)


def training_record(run, wall_s: float, fusion: dict, calibration: dict, validation: dict) -> dict:
    """The card's `training` section for a finished `epochs.Run`."""
    tc, model = run.cfg.train, run.model
    throughputs = [h["train_img_per_s"] for h in run.history if h.get("train_img_per_s")]
    return {
        "mode": tc.mode,
        "device": str(run.device),
        "amp": run.use_amp,
        "epochs_run": len(run.history),
        "epochs_configured": tc.epochs,
        "best_epochs": {k: v["epoch"] for k, v in run.best.items()},
        "wall_time_s": round(wall_s, 1),
        "train_img_per_s": round(float(np.median(throughputs)), 2) if throughputs else None,
        "backbones": {
            b.name: {"timm_name": b.timm_name, "initial_weights": b.pretrained}
            for b in run.cfg.model.backbones
        },
        "frozen_prefixes": list(tc.frozen_prefixes),
        "frozen_parameters": int(
            sum(p.numel() for n, p in model.named_parameters() if n in run.frozen)
        ),
        "recipe": {k: tc.model_dump(mode="json")[k] for k in RECIPE_KEYS},
        "fusion": fusion,
        "calibration": calibration,
        "operating_point": None,
        "validation": validation,
        "resumed": bool(run.start_epoch),
    }


def held_out_metrics(
    cfg: OrthoVisionConfig,
    data: PreparedData,
    stored: Ensemble,
    validation: dict,
    operating_point: dict | None,
) -> dict:
    """The held-out test split, once, on the weights as stored (float16 convs)."""
    tc, classes = cfg.train, list(cfg.model.classes)
    test_idx = data.indices("test")
    if not test_idx:
        return {}
    logits = predict_logits(stored, data.pixels[test_idx], tc.eval_batch_size)
    targets = np.asarray(data.targets("test"), dtype=np.int64)
    weights, temperature = stored.fusion_weights.numpy(), float(stored.temperature)
    report = compute_report(
        logits,
        targets,
        [data.samples[i].group for i in test_idx],
        classes,
        fusion_weights=weights,
        temperature=temperature,
        branch_val_accuracy={n: validation[n]["accuracy"] for n in stored.branch_names},
        abstain_threshold=cfg.fusion.abstain_threshold,
        n_bootstrap=tc.bootstrap_samples,
        seed=tc.seed,
    )
    metrics = {"split": "test", **report.card_metrics()}
    if operating_point is not None:
        k = classes.index("fracture")
        probs = fused_probabilities(logits, weights, temperature)
        metrics["operating_point"] = at_threshold(targets == k, probs[:, k], operating_point)
    return metrics


SEVERITY_NOTE = (
    "No severity score: the data has no severity labels (displacement, comminution, "
    "healing stage), so none is trained or reported; studies and timelines compare "
    "fracture probabilities only."
)


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
    notes.append(SEVERITY_NOTE)
    return notes
