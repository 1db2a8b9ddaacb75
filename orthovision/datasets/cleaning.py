"""Cleaning: every file goes through the serving decoder (rejects dropped with the
decoder's reason), exact duplicates dropped, model inputs cached as .npy by content hash.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from orthovision.config import OrthoVisionConfig
from orthovision.datasets.sources import Sample
from orthovision.errors import InputError
from orthovision.imaging.preprocess import Preprocessor
from orthovision.model.pipeline import model_pixels

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
