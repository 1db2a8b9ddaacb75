"""Evaluation of a checkpoint: the paper's Table 05 columns and more, honestly reported.

Per class precision, recall (= sensitivity), F1, accuracy (one-vs-rest), specificity;
macro and weighted means; one-vs-rest ROC AUC with a bootstrap 95% CI that resamples
*groups* (near-duplicate radiographs are not independent evidence); confusion matrix;
calibration (ECE, reliability diagram); image-level and group-level (majority vote per
group) results; the fusion ablation of the paper's section 5.3. A class with no samples
in the evaluated data is reported as such, never with a made-up number.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

log = logging.getLogger(__name__)

NO_SAMPLES = "no samples"
ECE_BINS = 15
REJECT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


# ---------------------------------------------------------------------------------------
# Model outputs


@torch.inference_mode()
@torch.inference_mode()
def branch_outputs(
    model, pixels: np.ndarray, batch_size: int = 64
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(penultimate features (N, D), logits (N, C)) per branch for uint8 (N, 1, S, S)
    inputs, in one pass, model in eval mode."""
    from orthovision.ood import branch_features

    was_training = model.training
    model.eval()
    feats: dict[str, list[np.ndarray]] = {n: [] for n in model.branch_names}
    logits: dict[str, list[np.ndarray]] = {n: [] for n in model.branch_names}
    for start in range(0, len(pixels), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch_size]))
        for name in model.branch_names:
            f, lg = branch_features(model.branches[name], model.branch_input(name, x))
            feats[name].append(f.float().cpu().numpy())
            logits[name].append(lg.float().cpu().numpy())
    model.train(was_training)
    num_classes = len(model.cfg.classes)

    def stack(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        return {
            n: np.concatenate(v) if v else np.zeros((0, num_classes), np.float32)
            for n, v in parts.items()
        }

    return stack(feats), stack(logits)


def predict_logits(
    model, pixels: np.ndarray, batch_size: int = 64, device: torch.device | str = "cpu"
) -> dict[str, np.ndarray]:
    """Branch logits (N, C) per branch (each branch runs on its own parameters' device)."""
    return branch_outputs(model, pixels, batch_size)[1]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fused_probabilities(
    logits: Mapping[str, np.ndarray], weights: Sequence[float], temperature: float = 1.0
) -> np.ndarray:
    """sum_k w_k softmax(logits_k / T), the Ensemble's fusion (orthovision.fusion) in numpy."""
    weights = np.asarray(weights, dtype=np.float64)
    weights = weights / weights.sum()
    probs = [softmax(lg, temperature) for lg in logits.values()]
    return sum(w * p for w, p in zip(weights, probs, strict=True))


# ---------------------------------------------------------------------------------------
# Metrics


def present_classes(y_true: np.ndarray, num_classes: int) -> list[int]:
    return [k for k in range(num_classes) if np.any(y_true == k)]


def selection_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Macro-F1, accuracy and ROC AUC over the classes with samples: what selection looks at."""
    if len(y_true) == 0:
        return {"macro_f1": 0.0, "accuracy": 0.0, "n": 0}
    pred = probs.argmax(1)
    labels = present_classes(y_true, len(classes))
    aucs = {
        classes[k]: float(roc_auc_score(y_true == k, probs[:, k]))
        for k in labels
        if len(labels) > 1
    }
    return {
        "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        "accuracy": float(np.mean(pred == y_true)),
        # Mean one-vs-rest ROC AUC over the classes present (threshold-free selection).
        "auc": float(np.mean(list(aucs.values()))) if aucs else 0.0,
        "auc_per_class": aucs,
        "n": len(y_true),
    }


def confusion(y_true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (y_true, pred), 1)
    return cm


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def per_class_table(y_true: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict:
    """Table 05 columns per class; classes without samples say so."""
    n = len(y_true)
    cm = confusion(y_true, pred, len(classes))
    rows: dict[str, dict | str] = {}
    for k, name in enumerate(classes):
        support = int(cm[k].sum())
        tp = int(cm[k, k])
        fp = int(cm[:, k].sum() - tp)
        fn = support - tp
        tn = n - tp - fp - fn
        if support == 0:
            rows[name] = {"support": 0, "status": NO_SAMPLES, "predicted": tp + fp}
            continue
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, support)
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision is not None and recall is not None and precision + recall > 0
            else 0.0
        )
        rows[name] = {
            "support": support,
            "precision": precision if precision is not None else 0.0,
            "recall": recall,
            "f1": f1,
            "accuracy": _ratio(tp + tn, n),  # one-vs-rest, as in the paper's Table 05
            "sensitivity": recall,
            "specificity": _ratio(tn, tn + fp),
        }
    return rows


def averages(rows: Mapping[str, dict | str]) -> dict:
    """Macro and support-weighted means over the classes that have samples."""
    present = {k: v for k, v in rows.items() if isinstance(v, dict) and v.get("support")}
    total = sum(v["support"] for v in present.values())
    out = {}
    for key in ("precision", "recall", "f1", "specificity"):
        vals = [(v[key], v["support"]) for v in present.values() if v.get(key) is not None]
        if not vals:
            continue
        out[f"macro_{key}"] = float(np.mean([x for x, _ in vals]))
        out[f"weighted_{key}"] = float(sum(x * s for x, s in vals) / total)
    return out


def roc_auc_ovr(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    groups: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """One-vs-rest AUC per class with a percentile bootstrap 95% CI.

    The bootstrap resamples groups (a cluster bootstrap) when given: images of one group
    are near-duplicates, and resampling them one by one would make the CI too narrow.
    """
    rng = np.random.default_rng(seed)
    group_ids = np.asarray(groups if groups is not None else np.arange(len(y_true)).astype(str))
    unique, inverse = np.unique(group_ids, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    out: dict[str, dict | str] = {}
    for k, name in enumerate(classes):
        positive = y_true == k
        if positive.all() or not positive.any():
            out[name] = {"status": NO_SAMPLES if not positive.any() else "no negatives"}
            continue
        auc = float(roc_auc_score(positive, probs[:, k]))
        boots = []
        for _ in range(n_bootstrap):
            idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
            pos = positive[idx]
            if pos.all() or not pos.any():
                continue
            boots.append(roc_auc_score(pos, probs[idx, k]))
        ci = (
            [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else None
        )
        out[name] = {"auc": auc, "ci95": ci, "bootstrap": len(boots)}
    return out


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Expected calibration error of the top-class confidence, with the diagram's bins."""
    conf = probs.max(1)
    correct = (probs.argmax(1) == y_true).astype(np.float64)
    edges = np.linspace(0, 1, bins + 1)
    table, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        mask = (conf > lo) & (conf <= hi)
        if not mask.any():
            continue
        acc, mean_conf, n = float(correct[mask].mean()), float(conf[mask].mean()), int(mask.sum())
        ece += n / len(y_true) * abs(acc - mean_conf)
        table.append(
            {"lo": float(lo), "hi": float(hi), "n": n, "accuracy": acc, "confidence": mean_conf}
        )
    nll = float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1))))
    return {"ece": float(ece), "nll": nll, "bins": table}


def classification_block(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: Sequence[str],
    groups: Sequence[str] | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    pred = probs.argmax(1)
    rows = per_class_table(y_true, pred, classes)
    labels = present_classes(y_true, len(classes))
    return {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(pred == y_true)),
        "macro_f1": float(f1_score(y_true, pred, labels=labels, average="macro", zero_division=0)),
        "per_class": rows,
        **averages(rows),
        "roc_auc": roc_auc_ovr(y_true, probs, classes, groups, n_bootstrap, seed),
        "confusion_matrix": confusion(y_true, pred, len(classes)).tolist(),
        "calibration": calibration(y_true, probs),
    }


def group_level(
    y_true: np.ndarray, probs: np.ndarray, groups: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """One row per group: majority true label, majority-vote prediction (ties by mean
    probability) encoded as a one-hot-ish probability row for the metrics, and the mean
    probabilities (for AUC)."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    names = sorted(by_group)
    g_true, g_vote, g_mean = [], [], []
    for g in names:
        idx = by_group[g]
        g_true.append(Counter(y_true[idx].tolist()).most_common(1)[0][0])
        mean = probs[idx].mean(0)
        votes = np.bincount(probs[idx].argmax(1), minlength=probs.shape[1]).astype(np.float64)
        # Majority vote; the mean probability breaks ties (scaled well below one vote).
        g_vote.append(votes + 1e-3 * mean)
        g_mean.append(mean)
    return np.asarray(g_true), np.asarray(g_vote), np.asarray(g_mean), names


def reject_rule(y_true: np.ndarray, probs: np.ndarray, thresholds=REJECT_THRESHOLDS) -> list[dict]:
    """Confidence-threshold abstention (paper 5.3): coverage and accuracy on what is kept."""
    conf, pred = probs.max(1), probs.argmax(1)
    rows = []
    for t in thresholds:
        keep = conf >= t
        rows.append(
            {
                "threshold": t,
                "coverage": float(keep.mean()) if len(keep) else 0.0,
                "accuracy_accepted": float((pred[keep] == y_true[keep]).mean())
                if keep.any()
                else None,
                "abstained": int((~keep).sum()),
            }
        )
    return rows


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
            "macro_f1": float(
                f1_score(y_true, pred, labels=present, average="macro", zero_division=0)
            ),
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
            "macro_f1": float(
                f1_score(
                    y_true[keep],
                    probs.argmax(1)[keep],
                    labels=present_classes(y_true[keep], len(classes)),
                    average="macro",
                    zero_division=0,
                )
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


def at_threshold(positive: np.ndarray, scores: np.ndarray, op: Mapping) -> dict:
    """Sensitivity and specificity of the card's operating point (threshold chosen on the
    validation split) on these data."""
    called = scores >= float(op["threshold"])
    return {
        "class": op.get("class"),
        "threshold": float(op["threshold"]),
        "chosen_on": op.get("chosen_on"),
        "target_sensitivity": op.get("target_sensitivity"),
        "sensitivity": float(called[positive].mean()),
        "specificity": float((~called[~positive]).mean()),
        "n_positive": int(positive.sum()),
        "n_negative": int((~positive).sum()),
    }


def operating_point(y_true: np.ndarray, scores: np.ndarray, min_specificity: float = 0.85) -> dict:
    """Highest sensitivity at specificity >= `min_specificity` (a ROC operating point)."""
    fpr, tpr, thr = roc_curve(y_true, scores)
    ok = (1 - fpr) >= min_specificity
    if not ok.any():
        return {"min_specificity": min_specificity, "sensitivity": None}
    i = int(np.argmax(np.where(ok, tpr, -1)))
    return {
        "min_specificity": min_specificity,
        "sensitivity": float(tpr[i]),
        "specificity": float(1 - fpr[i]),
        "threshold": float(thr[i]),
    }


# ---------------------------------------------------------------------------------------
# Plots and report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str):
    plt = _pyplot()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(curves: Mapping[str, tuple], aucs: Mapping, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    for name, (fpr, tpr) in curves.items():
        auc = aucs.get(name, {})
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc.get('auc', float('nan')):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC (one vs rest, image level)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reliability(cal: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    bins = cal["bins"]
    if bins:
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        ax.bar(
            centres,
            [b["accuracy"] for b in bins],
            width=1 / ECE_BINS,
            alpha=0.7,
            edgecolor="k",
            label="accuracy",
        )
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", ms=3)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability (ECE {cal['ece']:.3f})")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_history(history: Sequence[dict], path: Path) -> None:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    a1.set_xlabel("epoch")
    a1.legend()
    for key in history[0]["val"] if history else ():
        a2.plot(epochs, [h["val"][key]["macro_f1"] for h in history], "o-", label=f"val F1 {key}")
    a2.plot(epochs, [h["train_accuracy"] for h in history], "k--", label="train acc")
    a2.set_xlabel("epoch")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def markdown_report(report: EvaluationReport, title: str, context: Mapping | None = None) -> str:
    lines = [f"# {title}", ""]
    for key, value in (context or {}).items():
        lines.append(f"- {key}: {value}")
    lines.append("")
    for level, block in (("Image level", report.image), ("Group level", report.group)):
        lines += [
            f"## {level} (n = {block['n']})",
            "",
            f"accuracy {_fmt(block['accuracy'])}, macro-F1 {_fmt(block['macro_f1'])}, "
            f"ECE {_fmt(block['calibration']['ece'])}",
            "",
            "| class | support | precision | recall | F1 | accuracy | sensitivity | specificity "
            "| ROC AUC (95% CI) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in block["per_class"].items():
            auc = block["roc_auc"].get(name, {})
            if row.get("status"):
                lines.append(f"| {name} | 0 | {row['status']} | | | | | | |")
                continue
            ci = auc.get("ci95")
            auc_s = (
                f"{auc['auc']:.3f} ({ci[0]:.3f}-{ci[1]:.3f})"
                if "auc" in auc and ci
                else _fmt(auc.get("auc"))
                if "auc" in auc
                else auc.get("status", "n/a")
            )
            lines.append(
                f"| {name} | {row['support']} | {_fmt(row['precision'])} | {_fmt(row['recall'])} "
                f"| {_fmt(row['f1'])} | {_fmt(row['accuracy'])} | {_fmt(row['sensitivity'])} "
                f"| {_fmt(row['specificity'])} | {auc_s} |"
            )
        means = {k: v for k, v in block.items() if k.startswith(("macro_", "weighted_"))}
        lines += ["", ", ".join(f"{k} {_fmt(v)}" for k, v in means.items()), ""]
    lines += [
        "## Fusion ablation (same split)",
        "",
        "| variant | accuracy | macro-F1 | note |",
        "|---|---|---|---|",
    ]
    for row in report.ablation:
        note = row.get("status") or (f"coverage {row['coverage']:.3f}" if "coverage" in row else "")
        lines.append(
            f"| {row['variant']} | {_fmt(row.get('accuracy'))} | {_fmt(row.get('macro_f1'))} "
            f"| {note} |"
        )
    lines += [
        "",
        "## Confidence-threshold reject rule",
        "",
        "| threshold | coverage | accuracy on accepted |",
        "|---|---|---|",
    ]
    for row in report.reject:
        lines.append(
            f"| {row['threshold']:.2f} | {row['coverage']:.3f} | {_fmt(row['accuracy_accepted'])} |"
        )
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Checkpoint on a dataset folder


def split_samples(ckpt, data_path: Path | str, split: str, cache_dir=None, progress=False):
    """(samples, uint8 pixels, cleaning report) of a dataset folder, through the serving
    pipeline and the pixel cache; `split` "all" or one recorded in the checkpoint's
    splits.csv (by sha256), so the held-out images stay the held-out ones."""
    from orthovision.config import OrthoVisionConfig
    from orthovision.data import (
        PixelCache,
        clean_and_cache,
        detect_source,
        iter_source,
        read_split_csv,
    )

    cfg = OrthoVisionConfig.model_validate(
        {"model": ckpt.config.model.model_dump(), "preprocess": ckpt.config.preprocess.model_dump()}
    )
    samples = list(iter_source(detect_source(data_path)))
    cache_root = cache_dir if cache_dir is not None else cfg.train.cache_dir
    cache = PixelCache(cache_root or None, cfg.preprocess.param_hash())
    kept, pixels, cleaning = clean_and_cache(samples, cfg, cache, progress=progress)
    if split != "all":
        split_file = Path(ckpt.path) / "splits.csv"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file} not found: cannot select split {split!r}")
        membership = read_split_csv(split_file)
        idx = [i for i, s in enumerate(kept) if membership.get(s.sha256) == split]
        kept, pixels = [kept[i] for i in idx], pixels[idx]
    return kept, pixels, cleaning


def evaluate_checkpoint(
    checkpoint: Path | str,
    data_path: Path | str,
    out_dir: Path | str | None = None,
    *,
    split: str = "all",
    n_bootstrap: int = 1000,
    progress: bool = False,
    cache_dir: str | None = None,
    seed: int = 0,
) -> EvaluationReport:
    """Evaluate a checkpoint folder on a dataset folder (any supported layout).

    `split`: "all" images of the folder, or "train"/"val"/"test" as recorded in the
    checkpoint's splits.csv (by sha256), so the held-out images stay the held-out ones.
    """
    from orthovision.checkpoint import load_checkpoint
    from orthovision.ood import load_for_checkpoint

    ckpt = load_checkpoint(checkpoint)
    card = ckpt.card
    kept, pixels, cleaning = split_samples(ckpt, data_path, split, cache_dir, progress)
    classes = list(ckpt.config.model.classes)
    unknown = {s.label for s in kept} - set(classes)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not among the checkpoint's classes")
    model = ckpt.model
    features, logits = branch_outputs(model, pixels)  # features: the OOD table below
    y_true = np.asarray([classes.index(s.label) for s in kept], dtype=np.int64)
    groups = [s.group for s in kept]
    training = card.get("training", {})
    val_acc = {
        n: v["accuracy"]
        for n, v in training.get("validation", {}).items()
        if n in model.branch_names
    }
    report = compute_report(
        logits,
        y_true,
        groups,
        classes,
        fusion_weights=model.fusion_weights.numpy(),
        temperature=float(model.temperature),
        branch_val_accuracy=val_acc or None,
        abstain_threshold=ckpt.config.fusion.abstain_threshold,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    probs = fused_probabilities(logits, model.fusion_weights.numpy(), float(model.temperature))
    if "fracture" in classes and len(y_true):
        k = classes.index("fracture")
        pos = y_true == k
        if pos.any() and not pos.all():
            report.extra["fracture_operating_point"] = operating_point(pos, probs[:, k], 0.85)
            op = card.get("operating_point")
            if op and op.get("class") == "fracture":
                report.extra["card_operating_point"] = at_threshold(pos, probs[:, k], op)
    detector = load_for_checkpoint(checkpoint, card)
    if detector is not None:
        from orthovision.ood_eval import ood_report
        from orthovision.pipeline import LocalPredictor

        local = LocalPredictor(ckpt)
        report.extra["ood"] = ood_report(
            model,
            detector,
            card["ood"]["threshold"],
            pixels,
            lambda b: local.prepare(b).pixels,
            test_outputs=(features, logits),
        )
    report.extra.update(
        {
            "checkpoint": str(checkpoint),
            "data": str(data_path),
            "split": split,
            "images": len(kept),
            "groups": len(set(groups)),
            "cleaning": cleaning.summary(),
            "validated_classes": card.get("validated_classes", []),
            "not_validated_classes": [
                c for c in classes if c not in card.get("validated_classes", [])
            ],
        }
    )
    if out_dir is not None:
        write_outputs(report, Path(out_dir), checkpoint=Path(checkpoint))
    return report


def write_outputs(report: EvaluationReport, out_dir: Path, checkpoint: Path | None = None) -> None:
    """metrics.json, confusion/ROC/reliability/training-curve PNGs and report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    plot_confusion(
        report.image["confusion_matrix"],
        report.classes,
        out_dir / "confusion_matrix.png",
        "Confusion matrix (image level)",
    )
    plot_confusion(
        report.group["confusion_matrix"],
        report.classes,
        out_dir / "confusion_matrix_group.png",
        "Confusion matrix (group level)",
    )
    plot_roc(report.roc_curves, report.image["roc_auc"], out_dir / "roc.png")
    plot_reliability(report.image["calibration"], out_dir / "reliability.png")
    history_file = checkpoint / "history.json" if checkpoint else None
    if history_file is not None and history_file.is_file():
        history = json.loads(history_file.read_text())
        if history:
            plot_history(history, out_dir / "training_curves.png")
    context = {
        k: report.extra[k]
        for k in ("checkpoint", "data", "split", "images", "groups")
        if k in report.extra
    }
    (out_dir / "report.md").write_text(markdown_report(report, "OrthoVision evaluation", context))
