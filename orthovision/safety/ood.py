"""Out-of-distribution score: "not for me" on images the model never learned.

Mahalanobis distance in each branch's penultimate feature space (Lee et al. 2018, "A simple
unified framework for detecting out-of-distribution samples"): class means of the training
split's features and one shared covariance (Ledoit-Wolf shrinkage: a few thousand images
against 512-1280 dimensions), the distance to the nearest class mean, divided by the
feature dimension so that each branch contributes on the same scale (about 1 in
distribution). The score is the sum over branches. Chosen over the energy score because the
classifier head saw only two classes of radiographs: logit-based scores cannot tell a chest
film or a photograph from an unsure wrist, the features can (docs/SAFETY.md measures both).

The detector lives beside the weights in `ood.safetensors` (sha256 in the card); its
threshold is a quantile of the validation split's scores (`ood.threshold` in the card).
Torch-free: the features come from the branches (model/backbones.py `branch_features`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

OOD_FILE = "ood.safetensors"
METHOD = "mahalanobis-shared-covariance"


@dataclass
class BranchDetector:
    """One branch's class means (K, D) and shared precision (D, D)."""

    means: np.ndarray
    precision: np.ndarray

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance to the nearest class mean, per image, divided by the dimension."""
        f = np.asarray(features, dtype=np.float64)
        best = np.full(len(f), np.inf)
        for mean in self.means:
            d = f - mean
            best = np.minimum(best, np.einsum("nd,de,ne->n", d, self.precision, d))
        return best / self.means.shape[1]


def fit_branch(features: np.ndarray, labels: np.ndarray) -> BranchDetector:
    """Class means of the classes present, Ledoit-Wolf covariance of the class-centred data."""
    from sklearn.covariance import LedoitWolf

    f = np.asarray(features, dtype=np.float64)
    classes = np.unique(labels)
    means = np.stack([f[labels == k].mean(0) for k in classes])
    centred = f - means[np.searchsorted(classes, labels)]
    precision = LedoitWolf(assume_centered=True).fit(centred).get_precision()
    return BranchDetector(means=means, precision=precision)


class OODDetector:
    """Per-branch detectors; the score of an image is the sum of its branch scores."""

    def __init__(self, branches: Mapping[str, BranchDetector]) -> None:
        self.branches = dict(branches)

    @classmethod
    def fit(cls, features: Mapping[str, np.ndarray], labels: np.ndarray) -> OODDetector:
        return cls({name: fit_branch(f, labels) for name, f in features.items()})

    def score(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        return sum(self.branches[n].score(features[n]) for n in self.branches)

    def save(self, path: Path) -> str:
        """Write the tensors (float32) and return the file's sha256 for the card."""
        from safetensors.numpy import save_file

        tensors = {}
        for name, det in self.branches.items():
            tensors[f"{name}.means"] = det.means.astype(np.float32)
            tensors[f"{name}.precision"] = det.precision.astype(np.float32)
        save_file(tensors, str(path))
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def load(cls, path: Path, sha256: str, names: Sequence[str] | None = None) -> OODDetector:
        """Verify the sha256 against the card, then read the branches asked for (all: None)."""
        from safetensors.numpy import load

        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != sha256:
            raise ValueError(f"{path.name} does not match the card's sha256")
        tensors = load(blob)
        found = sorted({k.rsplit(".", 1)[0] for k in tensors})
        wanted = list(names) if names is not None else found
        return cls(
            {
                n: BranchDetector(
                    tensors[f"{n}.means"].astype(np.float64),
                    tensors[f"{n}.precision"].astype(np.float64),
                )
                for n in wanted
            }
        )


def fit_for_checkpoint(
    train_features: Mapping[str, np.ndarray],
    train_labels: np.ndarray,
    val_features: Mapping[str, np.ndarray],
    out_dir: Path,
    keep_fraction: float = 0.95,
) -> tuple[dict, np.ndarray]:
    """Fit on the training split's features, threshold at `keep_fraction` of validation
    images kept; write ood.safetensors. Returns the card's `ood` section and the validation
    scores (the drift baseline is built from them)."""
    detector = OODDetector.fit(train_features, np.asarray(train_labels))
    val_scores = detector.score(val_features)
    threshold = float(np.quantile(val_scores, keep_fraction))
    sha = detector.save(Path(out_dir) / OOD_FILE)
    section = {
        "method": METHOD,
        "file": OOD_FILE,
        "sha256": sha,
        "threshold": threshold,
        "threshold_rule": f"{keep_fraction:.0%} of validation images below it",
        "fitted_on": "train",
        "validation_baseline": {
            "median": float(np.median(val_scores)),
            "p95": float(np.quantile(val_scores, 0.95)),
            "abstain_rate": float(np.mean(val_scores > threshold)),
        },
    }
    return section, val_scores


def load_for_checkpoint(
    path: Path | str, card: Mapping, names: Sequence[str] | None = None
) -> OODDetector | None:
    """The checkpoint's detector (the branches asked for), or None when it has none."""
    section = card.get("ood")
    if not section:
        return None
    return OODDetector.load(Path(path) / section["file"], section["sha256"], names)
