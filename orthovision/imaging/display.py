"""The radiograph as a person sees it in the viewer, apart from the model input.

A browser shows PNG and JPEG itself but not DICOM, so a DICOM input gets a display
rendering: the same decode as the model's (VOI window, MONOCHROME1 inverted), at a size a
screen can use. Pixels only: nothing from the header is drawn into it, and the PNG
carries no text chunks.
"""

from __future__ import annotations

import cv2
import numpy as np

from orthovision.config import DecodeConfig
from orthovision.imaging.decode import decode_radiograph
from orthovision.imaging.preprocess import fit_within

# Enough to zoom into a 43 cm detector at ~0.2 mm a pixel, and a PNG of ~0.6-1.3 MB on the
# radiographs in ../shared/data/dicom (2048 px long side).
DISPLAY_MAX_SIDE_PX = 2048


def display_image(
    data: bytes, cfg: DecodeConfig, max_side_px: int = DISPLAY_MAX_SIDE_PX
) -> np.ndarray:
    """uint8 (H, W) grey, the source's aspect ratio, long side min(source's, max_side_px).

    Decodes no more than needed (JPEG 2000 resolution levels, integer reduction down to
    the bound), under the same bounds as any decode, then fits the long side."""
    pixels = decode_radiograph(data, cfg, target_side=max_side_px).pixels
    return fit_within(pixels, max_side_px) if max(pixels.shape) > max_side_px else pixels


def display_png(data: bytes, cfg: DecodeConfig, max_side_px: int = DISPLAY_MAX_SIDE_PX) -> bytes:
    """`display_image` as a greyscale PNG."""
    ok, png = cv2.imencode(".png", display_image(data, cfg, max_side_px))
    if not ok:
        raise ValueError("display rendering cannot be encoded")
    return png.tobytes()
