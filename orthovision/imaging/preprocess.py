"""Pixel pipeline shared by training and serving: pure array functions, then one Preprocessor.

Order matters for speed (docs/DESIGN.md: performance principles): the decoder already gave a
small image (DCT-domain / J2K-level reduction), we shrink to the model size and only
then run CLAHE, so CLAHE never touches a full-size radiograph.
"""

from __future__ import annotations

import cv2
import numpy as np

from orthovision.config import PreprocessConfig
from orthovision.imaging.pixels import rescale_to_uint8


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Linearly rescale any numeric greyscale array to uint8 over its own [min, max]."""
    if image.dtype == np.uint8:
        return image
    return rescale_to_uint8(image, float(image.min()), float(image.max()))


def fitted_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(width, height) after `fit_within(image, size)` of a (height, width) image."""
    scale = size / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a (height, width) image inside its letterboxed
    size x size model input: the geometry a heat map is mapped back to the source with."""
    new_w, new_h = fitted_size(height, width, size)
    return (size - new_w) // 2, (size - new_h) // 2, new_w, new_h


def fit_within(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the longer side equals `size`, keeping aspect ratio (area filter to shrink)."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = fitted_size(h, w, size)
    if (new_w, new_h) == (w, h):
        return image
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interp)


def stretch_to(image: np.ndarray, size: int) -> np.ndarray:
    """Resize to size x size, ignoring aspect ratio."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if max(h, w) > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def pad_center(image: np.ndarray, size: int, value: int = 0) -> np.ndarray:
    """Centre `image` on a size x size canvas filled with `value`."""
    h, w = image.shape[:2]
    top, left = (size - h) // 2, (size - w) // 2
    return cv2.copyMakeBorder(
        image, top, size - h - top, left, size - w - left, cv2.BORDER_CONSTANT, value=value
    )


def clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (paper 4.3: clip 2.0, 8x8 tiles)."""
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tile_grid, tile_grid)).apply(image)


class Preprocessor:
    """grey uint8 (H, W) of any size -> model input uint8 (1, S, S); train and serve share it."""

    def __init__(self, cfg: PreprocessConfig | None = None) -> None:
        self.cfg = cfg or PreprocessConfig()
        self._clahe = cv2.createCLAHE(
            clipLimit=self.cfg.clahe_clip_limit,
            tileGridSize=(self.cfg.clahe_tile_grid, self.cfg.clahe_tile_grid),
        )

    def __call__(self, grey: np.ndarray) -> np.ndarray:
        if grey.ndim != 2:
            raise ValueError(f"expected a 2-D greyscale image, got shape {grey.shape}")
        size = self.cfg.image_size
        grey = to_uint8(grey)
        if self.cfg.resize_mode == "stretch":
            out = self._clahe.apply(stretch_to(grey, size))
        else:
            # CLAHE before padding so the black border does not skew the tile histograms.
            out = pad_center(self._clahe.apply(fit_within(grey, size)), size, self.cfg.pad_value)
        return np.ascontiguousarray(out[None])

    def content_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(left, top, width, height) that a (height, width) grey image fills in the model
        input: the whole input when stretched, the letterbox's inner box otherwise."""
        size = self.cfg.image_size
        if self.cfg.resize_mode == "stretch":
            return 0, 0, size, size
        return letterbox_box(height, width, size)
