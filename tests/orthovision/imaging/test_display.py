"""The viewer's display rendering of a DICOM input: the source's aspect ratio, bounded
size, the model decode's windowing, pixels only."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from support.data import FAKE_PATIENT_ID, FAKE_PATIENT_NAME, SHARED
from support.images import gradient, make_dicom

from orthovision.config import DecodeConfig
from orthovision.imaging.decode import decode_radiograph
from orthovision.imaging.display import display_image, display_png

CFG = DecodeConfig()


@pytest.mark.parametrize(
    ("rows", "cols", "max_side", "expected"),
    [
        (600, 300, 2048, (600, 300)),  # small: as stored
        (3000, 1000, 2048, (2048, 683)),  # tall: long side bounded, aspect kept
        (900, 1200, 512, (384, 512)),
    ],
)
def test_display_keeps_the_aspect_ratio_within_the_bound(rows, cols, max_side, expected):
    data = make_dicom(pixels=gradient(rows, cols, np.uint16) >> 4)
    assert display_image(data, CFG, max_side).shape == expected


def test_display_is_windowed_like_the_model_input():
    """MONOCHROME1 inverted, VOI applied: the same picture as the model's decode."""
    pixels = gradient(400, 300, np.uint16) >> 4
    data = make_dicom(photometric="MONOCHROME1", pixels=pixels)
    shown = display_image(data, CFG)
    model = decode_radiograph(data, CFG, target_side=0).pixels
    np.testing.assert_array_equal(shown, model)


def test_display_png_is_pixels_only():
    png = display_png(make_dicom(pixels=gradient(300, 200, np.uint16) >> 4), CFG)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for chunk in (b"tEXt", b"zTXt", b"iTXt", b"eXIf"):
        assert chunk not in png
    assert FAKE_PATIENT_ID.encode() not in png and FAKE_PATIENT_NAME.encode() not in png
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape == (300, 200)


@pytest.mark.skipif(not (SHARED / "dicom").exists(), reason="../shared/data absent")
def test_real_jpeg2000_radiograph_is_shown_at_full_detail():
    data = (SHARED / "dicom" / "RG3_J2KR.dcm").read_bytes()
    shown = display_image(data, CFG)
    assert shown.shape == (1760, 1760) and shown.std() > 20
