"""Decode + preprocess time per full-size sample, and each DICOM's full decode by plugin.
`python -m bench.decode [--repeats N]` (one thread, the harness's full-size set).

Per sample: `prepare()` as the Preprocessor runs it (reduced decode where the format has
one). Per DICOM: pydicom's full-size decode with every installed plugin that can read it,
so a choice like CharLS over pylibjpeg for JPEG-LS shows as measured numbers.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import cv2
import pydicom
import torch
from pydicom.pixels import pixel_array

from bench import images as image_sets
from orthovision.config import OrthoVisionConfig
from orthovision.imaging.preprocess import Preprocessor
from orthovision.model.pipeline import prepare

PLUGINS = ("pyjpegls", "pylibjpeg", "pillow", "gdcm")


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    cfg = OrthoVisionConfig()
    pre = Preprocessor(cfg.preprocess)
    for s in image_sets.fullsize(8).samples:
        served = median_ms(lambda s=s: prepare(s.data, cfg, pre), args.repeats)
        line = f"{served:7.1f} ms prepare   {s.name}"
        if s.content_type == "application/dicom":
            ds = pydicom.dcmread(io.BytesIO(s.data))
            full = []
            for plugin in PLUGINS:
                try:
                    ms = median_ms(
                        lambda p=plugin, ds=ds: pixel_array(ds, index=0, decoding_plugin=p),
                        args.repeats,
                    )
                    full.append(f"{plugin} {ms:.0f} ms")
                except Exception:  # not installed, or cannot read this transfer syntax
                    continue
            line += f"   (full decode: {', '.join(full) or 'no plugin'})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
