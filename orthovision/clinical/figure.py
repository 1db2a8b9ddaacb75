"""The report's heat-map figure: the heat map on the source image where the service kept one,
else on the model input without its letterbox padding. Torch-free (it runs in the ingress).

The explainer stores the heat map as an RGBA layer of the 224x224 model input and the box
(`input_box`: left, top, width, height) the image fills inside it; cropping the layer to that
box and stretching it to the source's size undoes the letterbox, the same mapping the viewer
draws with.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class Figure:
    png: bytes
    width: int
    height: int
    caption: str


def _decode(png: bytes, flags: int) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(png, np.uint8), flags)
    if image is None:
        raise ValueError("stored image is not a PNG")
    return image


def _encode(image: np.ndarray) -> bytes:
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return png.tobytes()


def _crop(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, width, height = (int(v) for v in box)
    crop = image[max(0, top) : top + height, max(0, left) : left + width]
    if crop.size == 0:
        raise ValueError(f"input box {box} lies outside the {image.shape[:2]} image")
    return crop


def heatmap_on_source(source_png: bytes, heatmap_rgba_png: bytes, box) -> np.ndarray:
    """BGR source image with the heat map's RGBA layer, cropped to `box` and stretched to the
    source's size, alpha-blended over it."""
    source = _decode(source_png, cv2.IMREAD_COLOR).astype(np.float32)
    layer = _decode(heatmap_rgba_png, cv2.IMREAD_UNCHANGED)
    if layer.ndim != 3 or layer.shape[2] != 4:
        raise ValueError("the heat-map layer is not RGBA")
    h, w = source.shape[:2]
    layer = cv2.resize(_crop(layer, box), (w, h), interpolation=cv2.INTER_LINEAR)
    alpha = layer[..., 3:4].astype(np.float32) / 255.0
    blended = source * (1 - alpha) + layer[..., :3].astype(np.float32) * alpha
    return np.clip(blended + 0.5, 0, 255).astype(np.uint8)


def report_figure(
    overlay_png: bytes,
    input_box=None,
    heatmap_rgba_png: bytes | None = None,
    source_png: bytes | None = None,
) -> Figure:
    """The best figure the stored layers allow, with a caption saying what it shows."""
    if source_png and heatmap_rgba_png and input_box:
        image = heatmap_on_source(source_png, heatmap_rgba_png, input_box)
        h, w = image.shape[:2]
        caption = (
            f"Heat map on the source image ({w}x{h} px as windowed for display), mapped back "
            "from the 224x224 model input."
        )
        return Figure(_encode(image), w, h, caption)
    if input_box:
        image = _crop(_decode(overlay_png, cv2.IMREAD_COLOR), input_box)
        h, w = image.shape[:2]
        caption = (
            "Heat map on the model input (CLAHE, 224 px long side), letterbox padding removed; "
            "the source image itself was not kept by the service."
        )
        return Figure(_encode(image), w, h, caption)
    image = _decode(overlay_png, cv2.IMREAD_COLOR)
    h, w = image.shape[:2]
    return Figure(overlay_png, w, h, "Overlay on the 224x224 model input (letterboxed, CLAHE).")
