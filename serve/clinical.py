"""Helpers of the clinician and integration routes (viewer, PDF report, DICOM SR/SC, STOW-RS).

Kept out of serve/ingress.py so the ingress stays the routing table, and light to import:
the Fusion imports `encode_model_input` from here, and reportlab/highdicom load on first use.
"""

from __future__ import annotations

import base64
import datetime as dt
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from orthovision.clinical.figure import Figure
from orthovision.schema import PRIVATE_KEY

STATIC_DIR = Path(__file__).resolve().parent / "static"
# The viewer's files, by name: nothing else under static/ (or elsewhere) is ever served.
VIEWER_ASSETS = {
    "viewer.js": "text/javascript; charset=utf-8",
    "viewer.css": "text/css; charset=utf-8",
}


def public(record: dict) -> dict:
    """A stored record as the API shows it: without its private part."""
    return {k: v for k, v in record.items() if k != PRIVATE_KEY}


def private(record: dict) -> dict:
    return record.get(PRIVATE_KEY) or {}


def stored_record(result: dict, private_part: dict) -> dict:
    """A prediction as stored: its public result, plus the part only DICOM outputs read."""
    return {**result, PRIVATE_KEY: private_part}


def dicom_source(record: dict) -> dict | None:
    """The DICOM input's UIDs and patient/study attributes (None: the input was not DICOM)."""
    return private(record).get("dicom_source")


def created_at(record: dict) -> float:
    return private(record).get("created_at", time.time())


def pdf_report(record: dict, figure: Figure | None, note: str, priors: Sequence[str] = ()) -> bytes:
    """The PDF report of a stored prediction: no patient identifiers, only the source's
    SOPInstanceUID to find the image by; `priors`: lines on the patient's prior studies."""
    from orthovision.clinical.pdf import build_pdf_report

    created = dt.datetime.fromtimestamp(created_at(record), dt.timezone.utc)
    source = dicom_source(record) or {}
    sop = {"SOPInstanceUID": source["SOPInstanceUID"]} if source.get("SOPInstanceUID") else None
    return build_pdf_report(public(record), figure, note, created, sop, priors)


def sr_bytes(record: dict, source: dict) -> bytes:
    """The DICOM Comprehensive SR of a stored DICOM input's prediction (Part 10 bytes)."""
    from orthovision.clinical.dicom_objects import structured_report, to_bytes

    return to_bytes(structured_report(public(record), source, created_at(record)))


def study_sr_bytes(tenant: str, study: dict, instances: list[tuple[dict, dict]]) -> bytes:
    """The DICOM Comprehensive SR of a study from its (record, DICOM source) pairs; its
    UIDs follow the tenant, study and instances it covers."""
    from orthovision.clinical.dicom_objects import study_report, to_bytes

    ids = sorted(public(record)["request_id"] for record, _source in instances)
    seed = "/".join(["study", tenant, study["study_instance_uid"], *ids])
    pairs = [(public(record), source) for record, source in instances]
    newest = max(created_at(record) for record, _source in instances)
    return to_bytes(study_report(study, pairs, newest, seed))


def sc_bytes(record: dict, source: dict, overlay: bytes) -> bytes:
    """The DICOM Secondary Capture of its heat-map overlay PNG (Part 10 bytes)."""
    from orthovision.clinical.dicom_objects import secondary_capture, to_bytes

    rgb = png_to_rgb(overlay)
    return to_bytes(secondary_capture(rgb, public(record), source, created_at(record)))


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


def encode_display(png: bytes) -> str:
    """A display rendering's PNG as base64 text (records are JSON)."""
    return base64.b64encode(png).decode("ascii")


def display_png(record: dict) -> bytes | None:
    """The stored display rendering of a DICOM input (kept when asked for), or None."""
    text = private(record).get("display_png")
    return base64.b64decode(text) if text else None


def png_to_rgb(png: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError("stored overlay is not a PNG")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def viewer_file(name: str) -> bytes:
    return (STATIC_DIR / name).read_bytes()
