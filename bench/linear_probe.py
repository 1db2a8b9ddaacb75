"""Reference row of docs/TRAINING.md: logistic regression on frozen ImageNet Lite0 features.

    python -m bench.linear_probe [--checkpoint models/default] [--data ../shared/data/fracture-xray]

The checkpoint only supplies the recorded grouped split (splits.csv) and the preprocessing;
the features come from the ImageNet Lite0 weights, untouched. C is chosen on validation;
prints validation AUC per C and the test AUC of the chosen one.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from orthovision.config import OrthoVisionConfig
from orthovision.evaluation.run import branch_outputs, split_samples
from orthovision.model.backbones import build_ensemble
from orthovision.model.checkpoint import load_checkpoint

BRANCH = "efficientnet_lite0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/default")
    parser.add_argument("--data", default="../shared/data/fracture-xray")
    args = parser.parse_args()
    torch.set_num_threads(2)
    imagenet = build_ensemble(OrthoVisionConfig.load("docs/train-default.yaml").model)
    ckpt = load_checkpoint(args.checkpoint)

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        kept, pixels, _ = split_samples(ckpt, args.data, split)
        return branch_outputs(imagenet, pixels)[0][BRANCH], np.array(
            [s.label == "fracture" for s in kept]
        )

    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = map(features, ("train", "val", "test"))

    def fit(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=3000, class_weight="balanced").fit(x_tr, y_tr)

    val_auc = {c: roc_auc_score(y_va, fit(c).predict_proba(x_va)[:, 1]) for c in (0.01, 0.1, 1.0)}
    for c, auc in val_auc.items():
        print(f"C={c}: validation fracture AUC {auc:.4f}")
    best = max(val_auc, key=val_auc.get)
    test_auc = roc_auc_score(y_te, fit(best).predict_proba(x_te)[:, 1])
    print(f"chosen C={best}: test fracture AUC {test_auc:.4f}")


if __name__ == "__main__":
    main()
