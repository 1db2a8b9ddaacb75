"""Dataset folders in the real layouts (fracture-xray manifest, BTXRD csv), built in tmp."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from support.data import SHARED
from support.images import make_jpeg, make_png

BTXRD_SAMPLE = SHARED / "btxrd-labels" / "dataset-sample.csv"


def noise_image(seed: int, size: int = 48) -> np.ndarray:
    """A distinct greyscale image per seed (no accidental exact duplicates)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(30, 220, size, dtype=np.float64)[None, :] * np.ones((size, 1))
    return np.clip(base + rng.normal(0, 25, (size, size)), 0, 255).astype(np.uint8)


def write_fracture_layout(root: Path, groups_per_class: int = 6, per_group: int = 3) -> Path:
    """The shared fracture-xray layout: class folders + manifest.csv with groups."""
    rows, seed = [], 0
    for folder, label in (("fractured", "fractured"), ("not_fractured", "not fractured")):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for g in range(groups_per_class):
            for _ in range(per_group):
                seed += 1
                rel = f"{folder}/{seed:04d}.png"
                (root / rel).write_bytes(make_png(noise_image(seed)))
                rows.append({"file": rel, "label": label, "group": f"{folder}-{g}"})
    with (root / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["file", "label", "sha256", "group", "width", "height"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def write_btxrd_layout(root: Path, rows: list[dict[str, str]], seed0: int = 1000) -> Path:
    """A BTXRD download shape: dataset.csv (the real columns) + images/<image_id>."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    with (root / "dataset.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for i, row in enumerate(rows):
        (root / "images" / row["image_id"]).write_bytes(make_jpeg(noise_image(seed0 + i)))
    return root


def btxrd_rows() -> list[dict[str, str]]:
    """The real sample's rows when present, else rows in its exact format."""
    if BTXRD_SAMPLE.is_file():
        with BTXRD_SAMPLE.open(newline="") as fh:
            return list(csv.DictReader(fh))
    rows = []
    for i, (t, b, m) in enumerate([(0, 0, 0), (1, 1, 0), (1, 0, 1)] * 6):
        rows.append(
            {
                "image_id": f"IMG{i:06d}.jpeg",
                "center": "1",
                "tumor": str(t),
                "benign": str(b),
                "malignant": str(m),
            }
        )
    return rows
