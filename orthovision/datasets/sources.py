"""Dataset adapters: each yields `Sample(path, label, group, source)` from one layout
(fracture-xray manifest, BTXRD csv, class folders).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orthovision.config import DataSourceConfig
from orthovision.labels import CLASSES, FRACTURE_XRAY_LABELS, class_index

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".gif", ".bmp", ".tif", ".tiff")


class DatasetFormatError(ValueError):
    """A dataset folder or label file does not have the expected layout."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset: where its bytes are, its project label, and its group."""

    path: Path
    label: str  # one of labels.CLASSES
    group: str  # source-prefixed: never equal across sources
    source: str
    sha256: str = ""  # filled by cleaning

    @property
    def target(self) -> int:
        return class_index(self.label)


# Adapters


def iter_fracture_xray(root: Path, source: str = "fracture-xray") -> Iterator[Sample]:
    """The shared layout: `manifest.csv` (file, label, sha256, group, ...) + class folders."""
    manifest = root / "manifest.csv"
    if not manifest.is_file():
        raise DatasetFormatError(f"{root}: no manifest.csv (fracture-xray layout)")
    with manifest.open(newline="") as fh:
        for row in csv.DictReader(fh):
            label = FRACTURE_XRAY_LABELS.get(row["label"].strip())
            if label is None:
                raise DatasetFormatError(f"{manifest}: unknown label {row['label']!r}")
            group = row.get("group") or row["file"]
            yield Sample(root / row["file"], label, f"{source}:{group}", source)


# Columns of the patient identifier, when a BTXRD-like file has one (the public one has none).
_PATIENT_COLUMNS = ("patient_id", "patient", "patientid", "case_id", "subject_id")


def btxrd_label(row: dict[str, str]) -> str | None:
    """BTXRD columns -> project label: tumor=0 non-affected, benign=1, malignant=1; None if
    the flags contradict each other (both set, or a tumour with neither)."""

    def flag(name: str) -> int:
        value = (row.get(name) or "0").strip()
        return int(float(value)) if value else 0

    tumor, benign, malignant = flag("tumor"), flag("benign"), flag("malignant")
    if tumor == 0:
        return "non-affected" if benign == malignant == 0 else None
    if benign + malignant != 1:
        return None
    return "tumor-benign" if benign else "tumor-malignant"


def iter_btxrd(root: Path, image_dir: str | None = None, source: str = "btxrd") -> Iterator[Sample]:
    """A BTXRD download: `dataset.csv` (image_id, ..., tumor, benign, malignant, ...) + images.

    Group = patient id when the file has such a column, else the image id (the published
    file has no patient column: then only exact and near duplicates are guarded).
    """
    label_file = root / "dataset.csv"
    if not label_file.is_file():
        raise DatasetFormatError(f"{root}: no dataset.csv (BTXRD layout)")
    images = (
        root / image_dir
        if image_dir
        else next((d for d in (root / "images", root / "Images") if d.is_dir()), root)
    )
    with label_file.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = {f.strip().lower(): f for f in reader.fieldnames or ()}
        missing = {"image_id", "tumor", "benign", "malignant"} - set(fields)
        if missing:
            raise DatasetFormatError(f"{label_file}: missing columns {sorted(missing)}")
        patient_col = next((fields[c] for c in _PATIENT_COLUMNS if c in fields), None)
        for raw in reader:
            row = {k.strip().lower(): v for k, v in raw.items() if k is not None}
            label = btxrd_label(row)
            image_id = row["image_id"].strip()
            if label is None:
                log.warning("btxrd: %s has contradicting tumour flags; skipped", image_id)
                continue
            group = (raw.get(patient_col) or "").strip() if patient_col else ""
            yield Sample(images / image_id, label, f"{source}:{group or image_id}", source)


def iter_class_folders(
    root: Path, label_map: dict[str, str], source: str = "folders"
) -> Iterator[Sample]:
    """`root/<folder>/*.<image>`; `label_map` maps folder names to project labels (identity
    for folders already named like a class). Each file is its own group."""
    mapping = {**{c: c for c in CLASSES}, **FRACTURE_XRAY_LABELS, **label_map}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        label = mapping.get(folder.name)
        if label is None:
            log.warning("folders: %s has no label mapping; skipped", folder)
            continue
        class_index(label)  # a typo in the map fails loudly
        for path in sorted(folder.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                rel = path.relative_to(root).as_posix()
                yield Sample(path, label, f"{source}:{rel}", source)


def detect_source(path: Path | str, name: str | None = None) -> DataSourceConfig:
    """A DataSourceConfig for a folder by its layout (manifest.csv, dataset.csv, folders)."""
    root = Path(path)
    if (root / "manifest.csv").is_file():
        kind = "fracture-xray"
    elif (root / "dataset.csv").is_file():
        kind = "btxrd"
    elif root.is_dir():
        kind = "folders"
    else:
        raise DatasetFormatError(f"{root}: not a dataset folder")
    return DataSourceConfig(kind=kind, path=str(root), name=name)


def iter_source(cfg: DataSourceConfig) -> Iterator[Sample]:
    root = Path(cfg.path).expanduser()
    if not root.is_dir():
        raise DatasetFormatError(f"dataset folder not found: {root}")
    if cfg.kind == "fracture-xray":
        return iter_fracture_xray(root, cfg.source_name)
    if cfg.kind == "btxrd":
        return iter_btxrd(root, cfg.image_dir, cfg.source_name)
    return iter_class_folders(root, dict(cfg.label_map), cfg.source_name)
