"""Grouped, label-stratified train/val/test splits (no group crosses splits) and
splits.csv.
"""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

from orthovision.datasets.sources import Sample

SPLITS = ("train", "val", "test")


# Splits


def grouped_stratified_split(
    samples: Sequence[Sample],
    fractions: Sequence[float] = (0.70, 0.15, 0.15),
    seed: int = 0,
) -> list[str]:
    """Split name per sample: stratified by label, grouped (a group never crosses splits).

    Groups take their majority label. Within each label the groups are shuffled (seeded)
    and each goes to the split furthest below its image target, so split sizes track the
    fractions while group sizes vary (the fracture set's groups hold 1 to ~100 images).
    """
    group_labels: dict[str, Counter] = defaultdict(Counter)
    group_sizes: Counter = Counter()
    for s in samples:
        group_labels[s.group][s.label] += 1
        group_sizes[s.group] += 1
    by_label: dict[str, list[str]] = defaultdict(list)
    for group in sorted(group_labels):
        label = max(sorted(group_labels[group]), key=group_labels[group].get)
        by_label[label].append(group)

    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for label in sorted(by_label):
        groups = by_label[label]
        rng.shuffle(groups)
        total = sum(group_sizes[g] for g in groups)
        targets = [f * total for f in fractions]
        filled = [0.0] * len(fractions)
        for group in groups:
            # Relative deficit: the first three groups land in three different splits.
            k = max(range(len(fractions)), key=lambda j: (targets[j] - filled[j]) / targets[j])
            assignment[group] = SPLITS[k]
            filled[k] += group_sizes[group]
    return [assignment[s.group] for s in samples]


def split_summary(samples: Sequence[Sample], splits: Sequence[str]) -> dict:
    out: dict[str, dict] = {}
    for name in SPLITS:
        members = [s for s, sp in zip(samples, splits, strict=True) if sp == name]
        out[name] = {
            "images": len(members),
            "groups": len({s.group for s in members}),
            "per_class": {c: n for c, n in Counter(s.label for s in members).most_common()},
        }
    return out


def write_split_csv(rows: Sequence[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sha256", "group", "label", "split", "file"])
        writer.writeheader()
        writer.writerows(rows)


def read_split_csv(path: Path) -> dict[str, str]:
    """sha256 -> split name."""
    with path.open(newline="") as fh:
        return {row["sha256"]: row["split"] for row in csv.DictReader(fh)}


def one_per_group(samples: Sequence[Sample], limit: int) -> list[int]:
    """Indices of at most `limit` samples, one per near-duplicate group, chosen by sha256
    (deterministic, and never two near-copies of one image)."""
    first: dict[str, int] = {}
    for i in sorted(range(len(samples)), key=lambda i: samples[i].sha256):
        first.setdefault(samples[i].group, i)
    return sorted(first.values(), key=lambda i: samples[i].sha256)[:limit]
