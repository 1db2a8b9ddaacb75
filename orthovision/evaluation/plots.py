"""Evaluation figures (confusion matrices, ROC, reliability, training curves) with a
headless matplotlib.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from orthovision.evaluation.metrics import ECE_BINS

# Plots and report


def load_pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(cm: Sequence[Sequence[int]], classes: Sequence[str], path: Path, title: str):
    plt = load_pyplot()
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
    plt = load_pyplot()
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
    plt = load_pyplot()
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
    plt = load_pyplot()
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
