"""Before/after of the heat-map field mask (docs/DESIGN.md, "Heat maps") on the shared radiographs.

    python -m bench.heatmap_field [--checkpoint models/default] [--data ../shared/data]
                                  [--images 12] [--out out/heatmap-field]

For every shared DICOM and the full-size PNGs of the fracture set (one per near-duplicate
group, the first `--images` by sha256), GradCAM++ of the fused prediction twice: raw
(`mask_field=False`) and masked to the exposed field (the service's default). Prints, per
image, the share of the heat map's mass outside the exposed field (padding, black borders,
collimation) and whether the hottest pixel lies there, before and after; writes the two
overlays side by side as PNG into --out.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import cv2
import numpy as np
import torch

from orthovision.imaging.preprocess import Preprocessor
from orthovision.model.checkpoint import load_checkpoint
from orthovision.model.explain import explain, overlay_png
from orthovision.model.pipeline import decode_for_model


def inputs(data: Path, count: int) -> list[Path]:
    """The shared DICOMs, then the fracture set's full-size PNGs, one per group."""
    dicoms = sorted((data / "dicom").glob("*.dcm"))
    seen: set[str] = set()
    pngs: list[Path] = []
    with (data / "fracture-xray" / "manifest.csv").open() as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["sha256"])
    for row in rows:
        if row["format"].lower() == "png" and row["group"] not in seen:
            seen.add(row["group"])
            pngs.append(data / "fracture-xray" / row["file"])
    return dicoms + pngs[:count]


def outside_share(heatmap: np.ndarray, field: np.ndarray) -> tuple[float, bool]:
    """(share of the map's mass where the field is < 0.5, whether its peak lies there)."""
    outside = field < 0.5
    total = float(heatmap.sum())
    share = float(heatmap[outside].sum()) / total if total > 0 else 0.0
    return share, bool(outside.flat[int(heatmap.argmax())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="models/default")
    parser.add_argument("--data", default="../shared/data", type=Path)
    parser.add_argument("--images", type=int, default=12, help="full-size PNGs to include")
    parser.add_argument("--out", default="out/heatmap-field", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    ckpt = load_checkpoint(args.checkpoint)
    cfg, model = ckpt.config, ckpt.model
    preprocessor = Preprocessor(cfg.preprocess)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{'image':<36} {'outside field: before':>22} {'after':>8} {'peak outside':>13}")
    before_all, after_all = [], []
    for path in inputs(args.data, args.images):
        decoded = decode_for_model(path.read_bytes(), cfg)
        pixels = preprocessor(decoded.pixels)
        box = preprocessor.content_box(*decoded.pixels.shape)
        raw = explain(model, pixels, content_box=box, mask_field=False)
        masked = explain(model, pixels, target_class=raw.target_class, content_box=box)
        field = masked.field
        b_share, b_peak = outside_share(raw.heatmap, field)
        a_share, a_peak = outside_share(masked.heatmap, field)
        before_all.append(b_share)
        after_all.append(a_share)
        name = f"{path.parent.name}/{path.name}"[-36:]
        peaks = f"{'yes' if b_peak else 'no'} -> {'yes' if a_peak else 'no'}"
        print(f"{name:<36} {b_share:>22.1%} {a_share:>8.1%} {peaks:>13}")
        pair = [
            cv2.imdecode(np.frombuffer(overlay_png(pixels[0], m.heatmap), np.uint8), 1)
            for m in (raw, masked)
        ]
        cv2.imwrite(str(args.out / f"{path.stem}.png"), np.hstack(pair))
    print(
        f"{'mean over ' + str(len(before_all)) + ' images':<36} "
        f"{np.mean(before_all):>22.1%} {np.mean(after_all):>8.1%}"
    )
    print(f"overlays (left: raw, right: masked): {args.out}/")


if __name__ == "__main__":
    main()
