"""Input-quality validation (the paper's checks): structured findings with a severity.

Config decides which failed checks reject the image; the rest are warnings returned with
the prediction so a radiologist sees them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from orthovision.config import QualityCheck, QualityConfig
from orthovision.errors import QualityRejected
from orthovision.imaging.pixels import DecodedImage

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    check: QualityCheck
    severity: Severity
    message: str
    value: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class QualityReport:
    findings: tuple[Finding, ...]

    @property
    def passed(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "findings": [f.to_dict() for f in self.findings]}

    def raise_if_rejected(self) -> None:
        errors = [f.message for f in self.findings if f.severity == "error"]
        if errors:
            raise QualityRejected("image rejected by quality checks: " + "; ".join(errors))


def assess_quality(image: DecodedImage, cfg: QualityConfig | None = None) -> QualityReport:
    """Run every check on a decoded image; sizes come from the original file, pixels from the
    (possibly reduced) decode, which is enough for intensity statistics."""
    cfg = cfg or QualityConfig()
    found: list[tuple[QualityCheck, str, float]] = []
    width, height = image.original_size
    short, long_ = min(width, height), max(width, height)

    if short < cfg.min_side_px:
        found.append(("resolution", f"{width}x{height} px is below {cfg.min_side_px} px", short))
    if long_ / max(short, 1) > cfg.max_aspect_ratio:
        ratio = long_ / max(short, 1)
        found.append(
            ("aspect_ratio", f"aspect ratio {ratio:.1f} exceeds {cfg.max_aspect_ratio}", ratio)
        )
    if image.byte_size < cfg.min_bytes:
        found.append(
            ("byte_size", f"{image.byte_size} bytes is below {cfg.min_bytes}", image.byte_size)
        )
    if image.chroma > cfg.max_chroma:
        msg = f"colour image (chroma {image.chroma:.1f}): not a greyscale radiograph"
        found.append(("channels", msg, image.chroma))

    pixels = image.pixels
    mean = float(pixels.mean())
    std = float(pixels.std())
    if not cfg.min_mean_brightness <= mean <= cfg.max_mean_brightness:
        found.append(
            (
                "brightness",
                f"mean brightness {mean:.0f} outside "
                f"[{cfg.min_mean_brightness:.0f}, {cfg.max_mean_brightness:.0f}]",
                mean,
            )
        )
    if std < cfg.min_contrast_std:
        found.append(("contrast", f"almost uniform image (std {std:.1f})", std))
    clipped = float(np.count_nonzero(pixels >= 255)) / pixels.size
    if clipped > cfg.max_clipped_fraction:
        found.append(("saturation", f"{clipped:.0%} of pixels saturated", clipped))

    findings = tuple(
        Finding(check, "error" if check in cfg.reject else "warning", message, round(value, 4))
        for check, message, value in found
    )
    return QualityReport(findings)
