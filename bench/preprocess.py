"""Decode + preprocess benchmark: the reduced-size fast path vs full decode + full-size CLAHE.

Both paths run in this one process, on one core, on the same JPEG bytes; the ratio is the
claim. Usage: python -m bench.preprocess [--repeats N] [--image PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from orthovision.config import OrthoVisionConfig
from orthovision.imaging.decode import decode_radiograph
from orthovision.imaging.preprocess import Preprocessor, clahe

SHARED_IMAGE = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "fracture-xray"
    / "not_fractured"
    / "17ce2c3cb0616317.png"
)  # the 2460x2970 radiograph


def load_jpeg(path: Path | None) -> tuple[bytes, str]:
    """The shared 2460x2970 PNG re-encoded as a quality-90 JPEG, or a synthetic stand-in."""
    if path and path.exists():
        grey = np.asarray(Image.open(path).convert("L"))
        source = f"{path.name} re-encoded as JPEG q90"
    else:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:2970, 0:2460]
        grey = 60 + 120 * np.exp(-((xx - 1230) ** 2) / 2e5) + rng.normal(0, 6, xx.shape)
        grey = grey.clip(0, 255).astype(np.uint8)
        source = "synthetic 2460x2970 (../shared absent)"
    ok, buf = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes(), source


def time_ms(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--image", type=Path, default=SHARED_IMAGE)
    args = parser.parse_args()

    cv2.setNumThreads(1)  # one core, as the issue asks
    cfg = OrthoVisionConfig()
    pre = Preprocessor(cfg.preprocess)
    data, source = load_jpeg(args.image)

    def fast() -> np.ndarray:
        return pre(
            decode_radiograph(data, cfg.decode, target_side=cfg.preprocess.image_size).pixels
        )

    def naive() -> np.ndarray:
        grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"))  # full-size decode
        eq = clahe(grey, cfg.preprocess.clahe_clip_limit, cfg.preprocess.clahe_tile_grid)
        return cv2.resize(eq, (224, 224), interpolation=cv2.INTER_AREA)

    fast_ms, naive_ms = time_ms(fast, args.repeats), time_ms(naive, args.repeats)
    f50, n50 = statistics.median(fast_ms), statistics.median(naive_ms)
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}",
        "image": source,
        "bytes": len(data),
        "repeats": args.repeats,
        "fast_path_ms_p50": round(f50, 2),
        "fast_path_ms_min": round(min(fast_ms), 2),
        "full_decode_clahe_resize_ms_p50": round(n50, 2),
        "speedup": round(n50 / f50, 1),
    }
    print(f"image: {source} ({len(data)} bytes), {args.repeats} repeats, 1 thread")
    print(f"{'path':40s} {'p50 ms':>8s} {'min ms':>8s}")
    print(f"{'reduced decode + CLAHE at 224 (ours)':40s} {f50:8.2f} {min(fast_ms):8.2f}")
    print(f"{'full decode + full-size CLAHE + resize':40s} {n50:8.2f} {min(naive_ms):8.2f}")
    print(f"speedup: {n50 / f50:.1f}x")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
