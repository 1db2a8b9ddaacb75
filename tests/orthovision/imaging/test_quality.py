import numpy as np
import pytest

from orthovision.config import QualityConfig
from orthovision.errors import QualityRejected
from orthovision.imaging.pixels import DecodedImage
from orthovision.imaging.quality import assess_quality


def radiograph_like(h: int = 300, w: int = 250, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 30, np.float32)
    img[h // 5 : 4 * h // 5, w // 3 : 2 * w // 3] = 170  # a bright "bone"
    return (img + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)


def decoded(pixels: np.ndarray, size=None, chroma=0.0, byte_size=50_000, channels=1):
    h, w = pixels.shape
    return DecodedImage(
        pixels=pixels,
        format="png",
        original_size=size or (w, h),
        channels=channels,
        chroma=chroma,
        byte_size=byte_size,
    )


@pytest.mark.parametrize(
    ("image", "failed", "rejected"),
    [
        (decoded(radiograph_like()), set(), False),
        (decoded(radiograph_like(), size=(1, 1)), {"resolution"}, True),
        (decoded(radiograph_like(), size=(1, 20000)), {"resolution", "aspect_ratio"}, True),
        (decoded(radiograph_like(), size=(3000, 600)), {"aspect_ratio"}, True),
        (decoded(radiograph_like(), chroma=40.0, channels=3), {"channels"}, True),
        (decoded(np.full((300, 300), 128, np.uint8)), {"contrast"}, True),
        (decoded(radiograph_like() // 8), {"brightness"}, False),
        (
            decoded(np.where(radiograph_like() > 100, 240, 255).astype(np.uint8)),
            {"brightness", "saturation"},
            False,
        ),
        (decoded(radiograph_like(), byte_size=500), {"byte_size"}, False),
    ],
    ids=["ok", "1x1", "1x20000", "aspect", "colour", "uniform", "dark", "saturated", "tiny-file"],
)
def test_quality_checks(image, failed, rejected):
    report = assess_quality(image, QualityConfig())
    assert {f.check for f in report.findings} == failed
    assert report.passed is (not rejected)
    if rejected:
        with pytest.raises(QualityRejected):
            report.raise_if_rejected()
    else:
        report.raise_if_rejected()


def test_config_decides_reject_or_warn():
    image = decoded(radiograph_like() // 8)
    warn = assess_quality(image, QualityConfig())
    reject = assess_quality(image, QualityConfig(reject=("brightness",)))
    assert [f.severity for f in warn.findings] == ["warning"]
    assert [f.severity for f in reject.findings] == ["error"] and not reject.passed


def test_report_is_json_ready():
    d = assess_quality(decoded(radiograph_like(), byte_size=10)).to_dict()
    assert d["passed"] is True
    assert d["findings"][0]["check"] == "byte_size" and d["findings"][0]["severity"] == "warning"
