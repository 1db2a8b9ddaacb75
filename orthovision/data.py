"""Dataset adapters, cleaning, group-aware stratified splits, balancing and a pixel cache.

Each adapter yields `Sample(source, label, group)` records; several sources combine into one
4-class dataset (paper 4.1). Cleaning (paper 4.2) drops files the serving decoder rejects
and exact duplicates, and says why. Splits keep every group (near-duplicate group or
patient) on one side, so validation numbers are not inflated by leakage.

Pixels come from `orthovision.pipeline.model_pixels`, the very function serving runs, and
are cached as uint8 `.npy` keyed by the file's sha256 and the preprocessing hash: on a
2-core CPU an image is decoded and CLAHE-equalised once, not once per epoch.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from orthovision.config import DataSourceConfig, OrthoVisionConfig
from orthovision.errors import InputError
from orthovision.labels import CLASSES, FRACTURE_XRAY_LABELS, class_index
from orthovision.pipeline import model_pixels
from orthovision.preprocess import Preprocessor

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".gif", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "val", "test")

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


# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
# Cleaning + pixel cache


@dataclass
class CleaningReport:
    kept: int = 0
    dropped: list[dict[str, str]] = field(default_factory=list)  # {path, reason, detail}

    def counts(self) -> dict[str, int]:
        return dict(Counter(d["reason"] for d in self.dropped))

    def summary(self) -> dict:
        return {"kept": self.kept, "dropped": len(self.dropped), "by_reason": self.counts()}

    def lines(self) -> list[str]:
        head = f"cleaning: kept {self.kept}, dropped {len(self.dropped)} {self.counts()}"
        return [head] + [
            f"  dropped {d['path']}: {d['reason']} ({d['detail']})" for d in self.dropped
        ]


class PixelCache:
    """uint8 (1, S, S) model inputs on disk, keyed by file sha256 + preprocessing hash."""

    def __init__(self, root: Path | str | None, preprocess_hash: str) -> None:
        self.root = Path(root).expanduser() / preprocess_hash[:16] if root else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path | None:
        return None if self.root is None else self.root / sha256[:2] / f"{sha256}.npy"

    def get(self, sha256: str) -> np.ndarray | None:
        path = self._path(sha256)
        if path is None or not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # a torn write from an interrupted run: recompute
            return None

    def put(self, sha256: str, pixels: np.ndarray) -> None:
        path = self._path(sha256)
        if path is None:
            return
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.save(fh, pixels, allow_pickle=False)
        tmp.replace(path)  # atomic: readers never see half a file


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def clean_and_cache(
    samples: Iterable[Sample],
    cfg: OrthoVisionConfig,
    cache: PixelCache,
    progress: bool = False,
) -> tuple[list[Sample], np.ndarray, CleaningReport]:
    """Drop unreadable, undecodable and duplicate files; return kept samples and their pixels.

    Pixels are `model_pixels` output (the serving path's decode + preprocess), from the
    cache when present. Exact duplicates (same sha256) keep their first occurrence; a
    duplicate with a different label is reported as a label conflict.
    """
    from tqdm import tqdm

    preprocessor = Preprocessor(cfg.preprocess)
    report = CleaningReport()
    kept: list[Sample] = []
    pixels: list[np.ndarray] = []
    seen: dict[str, Sample] = {}
    samples = list(samples)
    for sample in tqdm(samples, desc="decode+CLAHE", disable=not progress, unit="img"):
        try:
            data = sample.path.read_bytes()
        except OSError as exc:
            report.dropped.append(
                {"path": str(sample.path), "reason": "unreadable", "detail": exc.strerror or ""}
            )
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            first = seen[digest]
            reason = "duplicate" if first.label == sample.label else "duplicate_label_conflict"
            report.dropped.append(
                {
                    "path": str(sample.path),
                    "reason": reason,
                    "detail": f"same bytes as {first.path}",
                }
            )
            continue
        arr = cache.get(digest)
        if arr is None:
            try:
                arr = model_pixels(data, cfg, preprocessor)
            except InputError as exc:
                report.dropped.append(
                    {"path": str(sample.path), "reason": exc.code, "detail": exc.message}
                )
                continue
            cache.put(digest, arr)
        sample = replace(sample, sha256=digest)
        seen[digest] = sample
        kept.append(sample)
        pixels.append(arr)
    report.kept = len(kept)
    size = cfg.preprocess.image_size
    stacked = np.stack(pixels) if pixels else np.zeros((0, 1, size, size), np.uint8)
    return kept, stacked, report


# ---------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------
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


def balanced_sampler(targets: Sequence[int], seed: int = 0) -> WeightedRandomSampler:
    """Each class drawn equally often in expectation (paper 4.2: WeightedRandomSampler)."""
    counts = class_counts(targets)
    per_sample = 1.0 / counts[np.asarray(targets, dtype=np.int64)]
    gen = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        torch.as_tensor(per_sample, dtype=torch.double), len(targets), True, generator=gen
    )


# ---------------------------------------------------------------------------------------
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


def write_split_csv(rows: Sequence[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sha256", "group", "label", "split", "file"])
        writer.writeheader()
        writer.writerows(rows)


def read_split_csv(path: Path) -> dict[str, str]:
    """sha256 -> split name."""
    with path.open(newline="") as fh:
        return {row["sha256"]: row["split"] for row in csv.DictReader(fh)}
