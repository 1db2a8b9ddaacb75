"""Ablation row of docs/TRAINING.md: horizontal-flip test-time augmentation, on the
validation split only (a model-selection question; the test split stays untouched).

    python -m bench.tta [--checkpoint models/default] [--data ../shared/data/fracture-xray]

Prints the fused and per-branch fracture AUC without and with flip TTA (the mean of the
probabilities of the image and its mirror), and the cost: twice the forwards.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from orthovision.evaluation.run import predict_logits, split_samples
from orthovision.model.checkpoint import load_checkpoint
from orthovision.model.probabilities import fused_probabilities, softmax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/default")
    parser.add_argument("--data", default="../shared/data/fracture-xray")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model
    classes = list(ckpt.config.model.classes)
    k = classes.index("fracture")
    kept, pixels, _ = split_samples(ckpt, args.data, "val")
    positive = np.array([s.label == "fracture" for s in kept])
    weights, temperature = model.fusion_weights.numpy(), float(model.temperature)
    plain = predict_logits(model, pixels)
    mirrored = predict_logits(model, np.ascontiguousarray(pixels[..., ::-1]))

    def aucs(logits: dict[str, np.ndarray]) -> dict[str, float]:
        out = {"fused": fused_probabilities(logits, weights, temperature)[:, k]}
        out |= {n: softmax(v, temperature)[:, k] for n, v in logits.items()}
        return out

    a, b = aucs(plain), aucs(mirrored)
    print(f"validation split: {len(kept)} images, {int(positive.sum())} fractures")
    for name in a:
        no_tta = roc_auc_score(positive, a[name])
        tta = roc_auc_score(positive, (a[name] + b[name]) / 2)
        print(f"{name:>20}: fracture AUC {no_tta:.4f} -> flip TTA {tta:.4f} ({tta - no_tta:+.4f})")


if __name__ == "__main__":
    main()
