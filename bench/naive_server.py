"""The naive baseline: one uvicorn/FastAPI process doing what a straightforward server does.

Per request: full-size decode (Pillow for PNG/JPEG; pydicom's full decode for DICOM, which
Pillow cannot read), CLAHE on the full-size image, letterbox to 224, then both backbones at
batch 1 (eager torch, its default thread count, plain NCHW, `torch.no_grad`), fused.
Requests are handled one at a time in the event loop: the *best* case for a naive server on
a small machine (concurrent requests in a thread pool would only oversubscribe the cores).

    python -m bench.naive_server --port 8011
"""

from __future__ import annotations

import argparse
import io

import cv2
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image

from orthovision.config import OrthoVisionConfig
from orthovision.imaging.decode import decode_radiograph, sniff_format
from orthovision.imaging.preprocess import fit_within, pad_center
from orthovision.model.checkpoint import load_checkpoint
from orthovision.model.device import resolve_device
from serve.runtime import checkpoint_path

cfg = OrthoVisionConfig()
ckpt = load_checkpoint(checkpoint_path(cfg))
device = resolve_device("auto")
model = ckpt.model.to(device).eval()
classes = list(ckpt.card["classes"])
clahe = cv2.createCLAHE(
    clipLimit=cfg.preprocess.clahe_clip_limit,
    tileGridSize=(cfg.preprocess.clahe_tile_grid,) * 2,
)
app = FastAPI(title="naive baseline")


def full_size_grey(data: bytes) -> np.ndarray:
    if sniff_format(data) == "dicom":
        return decode_radiograph(data, cfg.decode, target_side=0).pixels  # 0: full size
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def preprocess(data: bytes) -> np.ndarray:
    grey = full_size_grey(data)
    if grey.dtype != np.uint8:
        grey = cv2.normalize(grey, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    eq = clahe.apply(grey)  # full-size CLAHE
    size = cfg.preprocess.image_size
    return pad_center(fit_within(eq, size), size, cfg.preprocess.pad_value)[None]


@app.post("/predict")
async def predict(request: Request) -> JSONResponse:
    pixels = preprocess(await request.body())
    with torch.no_grad():
        out = model(torch.from_numpy(pixels)[None].to(device))
    probs = out.probabilities[0].float().cpu().tolist()
    return JSONResponse({"probabilities": dict(zip(classes, probs, strict=True))})


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, workers=1, log_level="warning")


if __name__ == "__main__":
    main()
