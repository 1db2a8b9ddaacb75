"""Dataset adapters, cleaning, group-aware stratified splits, balancing and a pixel cache.

Each adapter yields `Sample(source, label, group)` records; several sources combine into one
4-class dataset (paper 4.1). Cleaning (paper 4.2) drops files the serving decoder rejects
and exact duplicates, and says why. Splits keep every group (near-duplicate group or
patient) on one side, so validation numbers are not inflated by leakage.

Pixels come from `orthovision.model.pipeline.model_pixels`, the very function serving runs, and
are cached as uint8 `.npy` keyed by the file's sha256 and the preprocessing hash: on a
2-core CPU an image is decoded and CLAHE-equalised once, not once per epoch.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from orthovision.config import DataSourceConfig, OrthoVisionConfig
from orthovision.datasets.cleaning import CleaningReport, PixelCache, clean_and_cache
from orthovision.datasets.sources import Sample, iter_source
from orthovision.datasets.splits import grouped_stratified_split, split_summary
from orthovision.labels import CLASSES

log = logging.getLogger(__name__)


# Where each source's data comes from, for the model card (licences travel with weights).
DATASET_INFO: dict[str, dict[str, str]] = {
    "fracture-xray": {
        "title": 'Kaggle "Bone Fracture Binary Classification" (fracture-multi-region X-ray data)',
        "licence": "ODC-By 1.0",
        "attribution": (
            'Trained on the Kaggle dataset "Bone Fracture Binary Classification" '
            "(fracture-multi-region X-ray data), ODC-By 1.0."
        ),
    },
    "btxrd": {
        "title": "BTXRD bone tumour radiograph dataset (Yao et al., Sci. Data 2025)",
        "licence": "CC BY 4.0 (see the dataset's own terms)",
        "attribution": "BTXRD: Yao et al., Scientific Data 2025.",
    },
    "folders": {"title": "local class folders", "licence": "unknown (user data)"},
}


# Balancing


def class_counts(targets: Sequence[int], num_classes: int = len(CLASSES)) -> np.ndarray:
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes)


def class_weights(targets: Sequence[int], num_classes: int = len(CLASSES)) -> torch.Tensor:
    """Inverse-frequency loss weights, mean 1 over present classes; 0 for absent classes."""
    counts = class_counts(targets, num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sampler(
    targets: Sequence[int], seed: int = 0, groups: Sequence[str] | None = None
) -> WeightedRandomSampler:
    """Each class drawn equally often in expectation (paper 4.2: WeightedRandomSampler).

    With `groups`, each near-duplicate group is also drawn equally often within its class:
    a radiograph kept as 20 rotated copies no longer counts 20 times as much as one kept once.
    """
    y = np.asarray(targets, dtype=np.int64)
    if groups is None:
        per_sample = 1.0 / class_counts(targets)[y]
    else:
        if len(groups) != len(y):
            raise ValueError("groups and targets differ in length")
        keys = list(zip(y.tolist(), groups, strict=True))
        copies = Counter(keys)  # images of one group within one class
        groups_in_class = Counter(label for label, _ in copies)
        per_sample = np.array([1.0 / (groups_in_class[k[0]] * copies[k]) for k in keys])
    gen = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        torch.as_tensor(per_sample, dtype=torch.double), len(targets), True, generator=gen
    )


# Torch dataset


class CachedImageDataset(Dataset):
    """Preprocessed uint8 images in memory -> (uint8 (1, S, S) tensor, target int).

    `transform` (training augmentation) runs on the uint8 tensor, after every step that
    serving shares.
    """

    def __init__(self, pixels: np.ndarray, targets: Sequence[int], transform=None) -> None:
        if len(pixels) != len(targets):
            raise ValueError("pixels and targets differ in length")
        self.pixels = pixels
        self.targets = [int(t) for t in targets]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = torch.from_numpy(np.ascontiguousarray(self.pixels[index]))
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[index]


@dataclass
class PreparedData:
    """Every kept sample with its pixels and split, plus what cleaning dropped."""

    samples: list[Sample]
    pixels: np.ndarray  # (N, 1, S, S) uint8
    splits: list[str]
    report: CleaningReport
    sources: tuple[DataSourceConfig, ...]

    def indices(self, split: str) -> list[int]:
        return [i for i, s in enumerate(self.splits) if s == split]

    def targets(self, split: str | None = None) -> list[int]:
        idx = range(len(self.samples)) if split is None else self.indices(split)
        return [self.samples[i].target for i in idx]

    def groups(self, split: str) -> list[str]:
        return [self.samples[i].group for i in self.indices(split)]

    def dataset(self, split: str, transform=None) -> CachedImageDataset:
        idx = self.indices(split)
        return CachedImageDataset(self.pixels[idx], self.targets(split), transform)

    def classes_with_data(self, split: str) -> list[str]:
        present = {self.samples[i].label for i in self.indices(split)}
        return [c for c in CLASSES if c in present]

    def summary(self) -> dict:
        """The model card's `data` section: datasets with licences, cleaning, the split."""
        datasets = []
        for src in self.sources:
            n = sum(1 for s in self.samples if s.source == src.source_name)
            info = DATASET_INFO.get(src.kind, {})
            datasets.append({"name": src.source_name, "kind": src.kind, "images": n, **info})
        return {
            "datasets": datasets,
            "cleaning": self.report.summary(),
            "split": {
                "method": "stratified by label, grouped (no group crosses splits)",
                "splits": split_summary(self.samples, self.splits),
            },
        }

    def split_rows(self) -> list[dict[str, str]]:
        """sha256/group/label/split per image: lets evaluation find the held-out images."""
        return [
            {
                "sha256": s.sha256,
                "group": s.group,
                "label": s.label,
                "split": sp,
                "file": s.path.name,
            }
            for s, sp in zip(self.samples, self.splits, strict=True)
        ]


def prepare_data(
    cfg: OrthoVisionConfig,
    sources: Sequence[DataSourceConfig] | None = None,
    progress: bool = False,
) -> PreparedData:
    """Read, clean, cache and split the configured sources (train.sources by default)."""
    sources = tuple(sources if sources is not None else cfg.train.sources)
    samples: list[Sample] = []
    for src in sources:
        found = list(iter_source(src))
        log.info("source %s (%s): %d images", src.source_name, src.kind, len(found))
        samples.extend(found)
    cache = PixelCache(cfg.train.cache_dir or None, cfg.preprocess.param_hash())
    kept, pixels, report = clean_and_cache(samples, cfg, cache, progress=progress)
    for line in report.lines():
        log.info(line)
    splits = grouped_stratified_split(kept, cfg.train.split_fractions, cfg.train.seed)
    return PreparedData(kept, pixels, splits, report, sources)
