"""Markdown tables for the training docs: the backbone comparison (paper Table 04)."""

from __future__ import annotations

from collections.abc import Sequence

from orthovision.config import TrainConfig


def budget_line(tc: TrainConfig) -> str:
    steps = "full passes" if tc.max_steps_per_epoch is None else f"{tc.max_steps_per_epoch} steps"
    return (
        f"budget: {tc.epochs} epoch(s) of {steps} at batch {tc.batch_size} "
        f"({tc.optimizer} lr {tc.lr:g}, clip {tc.grad_clip_norm}), seed {tc.seed}, "
        f"balanced sampler, augmentation {'on' if tc.augment else 'off'}; "
        "scored on the grouped validation split"
    )


def comparison_table(rows: Sequence[dict], tc: TrainConfig) -> str:
    lines = [
        budget_line(tc),
        "",
        "| backbone | initial weights | params (M) | lr | val AUC | val macro-F1 "
        "| val accuracy | best pass / passes | train img/s | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: -(r.get("val_auc") or r["val_macro_f1"])):
        auc = r.get("val_auc")
        lines.append(
            f"| {r['backbone']} | {r['initial_weights']} | {r['params_m']} "
            f"| {r.get('lr', tc.lr):g} | {'-' if auc is None else f'{auc:.3f}'} "
            f"| {r['val_macro_f1']:.3f} | {r['val_accuracy']:.3f} "
            f"| {r.get('best_epoch')} / {r.get('epochs')} "
            f"| {r['train_img_per_s'] or 0:.1f} | {r['wall_time_s']:.0f} |"
        )
    return "\n".join(lines)
