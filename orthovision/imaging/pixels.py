"""Pixel helpers shared by the decoders: size bounds, integer downscaling, grey
conversion, alpha compositing and uint8 rescaling.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field, fields
from typing import Annotated

import cv2
import numpy as np
from PIL import Image
from pydantic import Field

from orthovision.config import DecodeConfig
from orthovision.errors import (
    InputTooLarge,
    UndecodableImage,
    UnsupportedFormat,
)

# Errors Pillow raises on corrupt or hostile PNG/JPEG streams (truncation, bad markers,
# bad EXIF, zlib errors surface as OSError / SyntaxError / ValueError / struct.error).
PIL_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, TypeError)


@dataclass(frozen=True, kw_only=True)
class InputInfo:
    """What a result reports about its input (the API's `Prediction.input`): declared once,
    here, and filled by the decoder. Safe facts only: no patient identifier."""

    format: str  # "png" | "jpeg" | "dicom"
    original_size: Annotated[
        tuple[int, int], Field(description="(width, height) as stored, before reduced decoding")
    ]
    channels: int  # channels in the source
    modality: str | None = None
    body_part: str | None = None
    photometric: str | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    bits_stored: int | None = None
    frames: int = 1
    frame_index: int = 0
    transfer_syntax: str | None = None


@dataclass(frozen=True, kw_only=True)
class DecodedImage(InputInfo):
    pixels: np.ndarray  # (H, W) uint8 grey, C-contiguous, bone bright
    chroma: float  # mean |colour - grey| (0..255) over the decoded pixels; 0.0 for grey
    byte_size: int
    reduced_factor: int = 1
    # DICOM inputs only: the source's UIDs and its patient/study module attributes, for
    # DICOM outputs (SR, SC) filed beside the source. May identify a patient: never in
    # metadata(), repr, logs or errors.
    dicom_source: dict[str, str] | None = field(default=None, repr=False, compare=False)

    def metadata(self) -> dict:
        """JSON-safe dict of everything but the pixels and the DICOM source (no patient
        identifiers are kept)."""
        meta = {f.name: getattr(self, f.name) for f in fields(self)}
        meta.pop("pixels")
        meta.pop("dicom_source")
        for key in ("original_size", "pixel_spacing_mm"):
            if meta[key] is not None:
                meta[key] = list(meta[key])
        return meta


def check_pixel_bounds(width: int, height: int, cfg: DecodeConfig, frames: int = 1) -> None:
    if width <= 0 or height <= 0:
        raise UndecodableImage(f"image header declares an empty size ({width}x{height})")
    if max(width, height) > cfg.max_side_px:
        raise InputTooLarge(
            f"image side {max(width, height)} px exceeds the limit of {cfg.max_side_px} px"
        )
    if width * height * frames > cfg.max_pixels:
        raise InputTooLarge(
            f"image declares {width}x{height}x{frames} pixels, over the limit of "
            f"{cfg.max_pixels} pixels"
        )


def check_decoded_bytes(width: int, height: int, bytes_per_pixel: int, cfg: DecodeConfig) -> None:
    """Refuse a decode whose estimated peak memory is over `cfg.max_decode_bytes`."""
    estimate = width * height * bytes_per_pixel
    if estimate > cfg.max_decode_bytes:
        raise InputTooLarge(
            f"decoding {width}x{height} pixels at {bytes_per_pixel} bytes each needs "
            f"~{estimate >> 20} MiB, over the limit of {cfg.max_decode_bytes >> 20} MiB"
        )


def resolve_target(cfg: DecodeConfig, target_side: int | None) -> int:
    if target_side is None:
        return cfg.min_decode_side_px
    if target_side < 0:
        raise ValueError("target_side must be >= 0 (0 = full size)")
    return target_side


def integer_factor(width: int, height: int, target: int) -> int:
    """Largest integer factor keeping the shorter side >= target (1 = no reduction)."""
    if target <= 0:
        return 1
    return max(1, min(width, height) // target)


def downscale(arr: np.ndarray, factor: int) -> np.ndarray:
    """INTER_AREA by an integer factor (block mean), keeping the shorter side >= target."""
    if factor <= 1:
        return arr
    height, width = arr.shape[:2]
    size = (math.ceil(width / factor), math.ceil(height / factor))
    if arr.dtype in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        return cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    # cv2 has no INTER_AREA for 32-bit ints; go through float64 (exact for < 2**53).
    out = cv2.resize(arr.astype(np.float64), size, interpolation=cv2.INTER_AREA)
    return np.rint(out).astype(arr.dtype)


def rgb_to_grey(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """ITU-R BT.601 luma (cv2 uses the 601 weights) and mean |channel - luma| as chroma."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    deviation = np.abs(rgb.astype(np.int16) - grey[..., None].astype(np.int16))
    return grey, float(deviation.mean())


def composite_on_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Radiograph background is black: transparent pixels become 0.

    In bands of rows, so the 16-bit intermediates never cost more than a band.
    """
    out = np.empty(colour.shape, np.uint8)
    for r in range(0, colour.shape[0], _BAND_ROWS):
        a = alpha[r : r + _BAND_ROWS].astype(np.uint16)
        if colour.ndim == 3:
            a = a[..., None]
        band = colour[r : r + _BAND_ROWS].astype(np.uint16)
        out[r : r + _BAND_ROWS] = (band * a + 127) // 255
    return out


_BAND_ROWS = 256


def rescale_to_uint8(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(arr.shape, np.uint8)
    scaled = (arr.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def pil_to_grey(img: Image.Image, factor: int) -> tuple[np.ndarray, float]:
    """Any loaded Pillow PNG/JPEG image -> (grey uint8 downscaled by `factor`, chroma)."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "1":
        img = img.convert("L")
        mode = "L"
    elif mode == "CMYK":  # Pillow undoes Adobe's inverted CMYK while decoding
        img = img.convert("RGB")
        mode = "RGB"

    arr = np.asarray(img)
    img.close()  # the numpy copy is all we need: free Pillow's buffer before the copies
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        raw = arr
        # 16-bit grey: the image's own [min, max] maps linearly onto 0..255.
        low, high = float(raw.min()), float(raw.max())
        return rescale_to_uint8(downscale(raw, factor), low, high), 0.0
    if mode == "L":
        return downscale(arr, factor), 0.0
    if mode == "LA":
        return downscale(composite_on_black(arr[..., 0], arr[..., 1]), factor), 0.0
    if mode == "RGBA":
        rgb = composite_on_black(arr[..., :3], arr[..., 3])
        return rgb_to_grey(downscale(rgb, factor))
    if mode == "RGB":
        return rgb_to_grey(downscale(arr, factor))
    raise UnsupportedFormat(f"unsupported pixel mode {mode}")
