"""Classification metrics: per-class table, ROC AUC with group-bootstrap CIs, calibration
(ECE), group-level voting, the reject rule and operating points. Classes without samples
are reported as "no samples", never as numbers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

from orthovision.model.probabilities import nll

NO_SAMPLES = "no samples"
ECE_BINS = 15
REJECT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


# Metrics


def macro_f1(y_true: np.ndarray, pred: np.ndarray, labels: Sequence[int]) -> float:
    """Macro F1 over `labels` (the classes present: absent ones would count as 0)."""
    return float(f1_score(y_true, pred, labels=list(labels), average="macro", zero_division=0))


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
        "macro_f1": macro_f1(y_true, pred, labels),
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
    return {"ece": float(ece), "nll": nll(y_true, probs), "bins": table}


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
        "macro_f1": macro_f1(y_true, pred, labels),
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
