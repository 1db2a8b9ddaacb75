"""The benchmark's image sets, the same bytes for every system under test.

- ``jpeg224``: 224x224 JPEG radiographs from ../shared/data/fracture-xray (92% of that set).
- ``fullsize``: the large PNG radiographs there, re-encoded as quality-90 JPEG (what a PACS
  export usually is), plus the shared DICOMs (JPEG 2000, JPEG Lossless, JPEG-LS, 12-bit JPEG).

Every sample is checked once with the service's own `prepare` so a benchmark never measures
rejections. Without ../shared, synthetic radiograph-like images stand in (and say so).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from orthovision.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT
SHARED = ROOT.parent / "shared" / "data"
FRACTURE_XRAY = SHARED / "fracture-xray"
DICOM_DIR = SHARED / "dicom"
FULLSIZE_MIN_PIXELS = 1_500_000  # "full size": a detector image, not a thumbnail


@dataclass(frozen=True)
class Sample:
    name: str
    data: bytes
    content_type: str


@dataclass(frozen=True)
class ImageSet:
    name: str
    samples: tuple[Sample, ...]
    source: str  # where the bytes came from, for the report

    @property
    def mean_bytes(self) -> int:
        return int(np.mean([len(s.data) for s in self.samples]))


def _manifest_rows() -> list[dict]:
    path = FRACTURE_XRAY / "manifest.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return sorted(csv.DictReader(fh), key=lambda r: r["file"])


def _synthetic_radiograph(width: int, height: int, seed: int) -> np.ndarray:
    """A bright bone-like band on a dark, noisy background (contrast passes the quality gate)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    centre = width * (0.4 + 0.2 * rng.random())
    bone = 140 * np.exp(-((xx - centre) ** 2) / (2 * (0.08 * width) ** 2))
    grey = 40 + bone + 0.1 * yy / height * 60 + rng.normal(0, 6, (height, width))
    return grey.clip(0, 255).astype(np.uint8)


def _jpeg(grey: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _accepted(samples: list[Sample]) -> list[Sample]:
    """Keep only what the service classifies (a rejected input would measure an error path)."""
    from orthovision.config import OrthoVisionConfig
    from orthovision.errors import InputError
    from orthovision.imaging.preprocess import Preprocessor
    from orthovision.model.pipeline import prepare

    cfg = OrthoVisionConfig()
    pre = Preprocessor(cfg.preprocess)
    kept = []
    for s in samples:
        try:
            prepare(s.data, cfg, pre)
        except InputError:
            continue
        kept.append(s)
    return kept


def jpeg224(count: int = 64) -> ImageSet:
    rows = [
        r
        for r in _manifest_rows()
        if r["format"] == "JPEG" and r["width"] == "224" and r["height"] == "224"
    ]
    if rows:
        # Spread over the whole (sorted) list: both classes, many near-duplicate groups.
        step = max(1, len(rows) // count)
        picked = rows[::step][:count]
        samples = [
            Sample(r["file"], (FRACTURE_XRAY / r["file"]).read_bytes(), "image/jpeg")
            for r in picked
        ]
        return ImageSet("jpeg224", tuple(_accepted(samples)), "shared fracture-xray 224x224 JPEG")
    samples = [
        Sample(f"synthetic-{i}.jpg", _jpeg(_synthetic_radiograph(224, 224, i)), "image/jpeg")
        for i in range(min(count, 16))
    ]
    return ImageSet("jpeg224", tuple(samples), "synthetic 224x224 JPEG (../shared absent)")


def fullsize(count: int = 12, with_dicom: bool = True) -> ImageSet:
    rows = [
        r
        for r in _manifest_rows()
        if r["format"] == "PNG" and int(r["width"]) * int(r["height"]) >= FULLSIZE_MIN_PIXELS
    ]
    samples: list[Sample] = []
    for r in rows[:count]:
        grey = cv2.imread(str(FRACTURE_XRAY / r["file"]), cv2.IMREAD_GRAYSCALE)
        if grey is not None:
            samples.append(Sample(r["file"] + ".q90.jpg", _jpeg(grey), "image/jpeg"))
    if with_dicom and DICOM_DIR.is_dir():
        samples += [
            Sample(p.name, p.read_bytes(), "application/dicom")
            for p in sorted(DICOM_DIR.glob("*.dcm"))
        ]
    if samples:
        kept = _accepted(samples)
        n_png = sum(s.content_type == "image/jpeg" for s in kept)
        source = (
            f"{n_png} shared full-size PNG radiographs re-encoded as JPEG q90 "
            f"+ {len(kept) - n_png} shared DICOMs"
        )
        return ImageSet("fullsize", tuple(kept), source)
    samples = [
        Sample(f"synthetic-{i}.jpg", _jpeg(_synthetic_radiograph(2460, 2970, i)), "image/jpeg")
        for i in range(4)
    ]
    return ImageSet("fullsize", tuple(samples), "synthetic 2460x2970 JPEG (../shared absent)")


def multipart(
    samples: tuple[Sample, ...] | list[Sample], field: str = "files"
) -> tuple[bytes, str]:
    """One multipart/form-data body holding every sample (for /v1/predict/batch)."""
    boundary = "orthovision-bench-7d3f0c"
    parts = []
    for s in samples:
        parts.append(
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
                f'filename="{Path(s.name).name}"\r\nContent-Type: {s.content_type}\r\n\r\n'
            ).encode()
            + s.data
            + b"\r\n"
        )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"
