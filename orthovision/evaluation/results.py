"""`EvaluationReport`: every metric of one evaluation (image and group level, fusion
ablation, reject curve), computed from labels and per-branch logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_curve

from orthovision.evaluation.metrics import (
    REJECT_THRESHOLDS,
    calibration,
    classification_block,
    group_level,
    macro_f1,
    present_classes,
    reject_rule,
    roc_auc_ovr,
)
from orthovision.model.probabilities import fused_probabilities, softmax


@dataclass
class EvaluationReport:
    classes: list[str]
    image: dict
    group: dict
    ablation: list[dict]
    reject: list[dict]
    roc_curves: dict = field(default_factory=dict)  # class -> (fpr, tpr) for the plot
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "classes": self.classes,
            "image_level": self.image,
            "group_level": self.group,
            "fusion_ablation": self.ablation,
            "reject_rule": self.reject,
            **self.extra,
        }

    def card_metrics(self) -> dict:
        """What the model card keeps: both levels without the bulky calibration bins."""

        def slim(block: dict) -> dict:
            cal = block["calibration"]
            return {**block, "calibration": {"ece": cal["ece"], "nll": cal["nll"]}}

        return {
            "image_level": slim(self.image),
            "group_level": slim(self.group),
            "fusion_ablation": self.ablation,
            "reject_rule": self.reject,
        }

    def summary(self) -> dict:
        """The short JSON the CLI prints."""

        def short(block: dict) -> dict:
            return {
                "n": block["n"],
                "accuracy": block["accuracy"],
                "macro_f1": block["macro_f1"],
                "roc_auc": block["roc_auc"],
                "ece": block["calibration"]["ece"],
                "per_class": {
                    k: (
                        {m: v.get(m) for m in ("support", "f1", "sensitivity", "specificity")}
                        if v.get("status") is None
                        else v
                    )
                    for k, v in block["per_class"].items()
                },
            }

        return {
            "image_level": short(self.image),
            "group_level": short(self.group),
            "fusion_ablation": [
                {k: r[k] for k in ("variant", "accuracy", "macro_f1")} for r in self.ablation
            ],
            **{k: v for k, v in self.extra.items() if k != "history"},
        }


def compute_report(
    logits: Mapping[str, np.ndarray],
    y_true: np.ndarray,
    groups: Sequence[str],
    classes: Sequence[str],
    *,
    fusion_weights: Sequence[float],
    temperature: float = 1.0,
    branch_val_accuracy: Mapping[str, float] | None = None,
    abstain_threshold: float = 0.5,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> EvaluationReport:
    classes = list(classes)
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = fused_probabilities(logits, fusion_weights, temperature)
    image = classification_block(y_true, probs, classes, groups, n_bootstrap, seed)
    g_true, g_vote, g_mean, _ = group_level(y_true, probs, groups)
    group = classification_block(g_true, g_vote / g_vote.sum(1, keepdims=True), classes)
    # AUC at group level ranks the groups' mean probabilities (votes are too coarse).
    group["roc_auc"] = roc_auc_ovr(g_true, g_mean, classes, None, n_bootstrap, seed)
    group["calibration"] = calibration(g_true, g_mean)
    group["vote"] = "majority of image predictions; mean probability breaks ties"

    names = list(logits)
    variants: list[tuple[str, np.ndarray]] = [
        (f"{n} alone", softmax(logits[n], temperature)) for n in names
    ]
    variants.append(
        ("probability average", fused_probabilities(logits, [1.0] * len(names), temperature))
    )
    if branch_val_accuracy and all(n in branch_val_accuracy for n in names):
        acc_w = [max(branch_val_accuracy[n], 1e-6) for n in names]
        variants.append(
            ("validation-accuracy weighting", fused_probabilities(logits, acc_w, temperature))
        )
    variants.append(("learned fusion", probs))
    ablation = []
    for name, p in variants:
        pred = p.argmax(1)
        present = present_classes(y_true, len(classes))
        row = {
            "variant": name,
            "accuracy": float(np.mean(pred == y_true)) if len(y_true) else None,
            "macro_f1": macro_f1(y_true, pred, present),
            "roc_auc": {
                k: v.get("auc") if isinstance(v, dict) else None
                for k, v in roc_auc_ovr(y_true, p, classes, n_bootstrap=0).items()
            },
        }
        ablation.append(row)
    if not branch_val_accuracy:
        ablation.append(
            {"variant": "validation-accuracy weighting", "status": "no validation accuracies"}
        )
    reject = reject_rule(y_true, probs, sorted({*REJECT_THRESHOLDS, abstain_threshold}))
    keep = probs.max(1) >= abstain_threshold
    ablation.append(
        {
            "variant": f"learned fusion + reject below {abstain_threshold:.2f}",
            "accuracy": float((probs.argmax(1)[keep] == y_true[keep]).mean())
            if keep.any()
            else None,
            "macro_f1": macro_f1(
                y_true[keep], probs.argmax(1)[keep], present_classes(y_true[keep], len(classes))
            )
            if keep.any()
            else None,
            "coverage": float(keep.mean()) if len(keep) else 0.0,
        }
    )
    curves = {}
    for k, name in enumerate(classes):
        positive = y_true == k
        if positive.any() and not positive.all():
            fpr, tpr, _ = roc_curve(positive, probs[:, k])
            curves[name] = (fpr, tpr)
    return EvaluationReport(classes, image, group, ablation, reject, curves)
