"""Helpers of the clinician and integration routes (viewer, PDF report, DICOM SR/SC, STOW-RS).

Kept out of serve/ingress.py so the ingress stays the routing table, and light to import:
the Explainer imports `layers_key` from here, and reportlab/highdicom load on first use.
"""

from __future__ import annotations

import base64
from pathlib import Path

import cv2
import numpy as np

from orthovision.schema import PRIVATE_KEY

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The viewer's files, by name: nothing else under static/ (or elsewhere) is ever served.
VIEWER_ASSETS = {
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
}
LAYER_KINDS = ("image", "heatmap")


def layers_key(explanation_id: str) -> str:
    """Store key of an explanation's separate layers (model input, transparent heat map)."""
    return f"{explanation_id}:layers"


def layer_png(layers: dict | None, kind: str) -> bytes | None:
    if not layers or f"{kind}_png" not in layers:
        return None
    return base64.b64decode(layers[f"{kind}_png"])


def public(record: dict) -> dict:
    """A stored record as the API shows it: without its private part."""
    return {k: v for k, v in record.items() if k != PRIVATE_KEY}


def private(record: dict) -> dict:
    return record.get(PRIVATE_KEY) or {}


def encode_model_input(pixels: np.ndarray) -> str:
    """uint8 (1, S, S) model input -> base64 PNG text (records are JSON)."""
    ok, png = cv2.imencode(".png", np.ascontiguousarray(pixels[0]))
    if not ok:
        raise ValueError("model input cannot be encoded")
    return base64.b64encode(png.tobytes()).decode("ascii")


def decode_model_input(text: str) -> np.ndarray:
    """The inverse of encode_model_input: uint8 (1, S, S)."""
    grey = cv2.imdecode(np.frombuffer(base64.b64decode(text), np.uint8), cv2.IMREAD_GRAYSCALE)
    if grey is None:
        raise ValueError("stored model input is not a PNG")
    return grey[None]


def png_to_rgb(png: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("stored overlay is not a PNG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def viewer_file(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()
