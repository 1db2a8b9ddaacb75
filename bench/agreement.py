"""Does a faster CPU backend give the same answers as fp32 torch? `python -m bench.agreement`

On the validation split of ../shared/data/fracture-xray (the training config's grouped,
stratified split: no near-duplicate of a training image) plus the shared DICOMs and full-size
radiographs, it runs the checkpoint's two branches through eager fp32 torch and through the
candidate backend, fuses both with the checkpoint's weights and temperature, and reports:
- top-1 agreement of the fused probabilities, and per branch;
- the largest absolute probability difference (fused and per branch);
- accuracy on the validation split for each (meaningful only for a trained checkpoint: the
  acceptance rule is |accuracy(candidate) - accuracy(fp32)| <= 0.5 points).
Last line: `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.images import DICOM_DIR, FRACTURE_XRAY, fullsize
from orthovision.config import OrthoVisionConfig
from orthovision.imaging.preprocess import Preprocessor
from orthovision.labels import CLASSES
from orthovision.model.checkpoint import load_checkpoint
from orthovision.model.pipeline import model_pixels
from orthovision.model.tensors import to_model_input
from serve.runtime import checkpoint_path


def validation_images(cfg: OrthoVisionConfig, limit: int | None) -> tuple[list[bytes], list[int]]:
    from orthovision.datasets.sources import iter_fracture_xray
    from orthovision.datasets.splits import grouped_stratified_split

    if not (FRACTURE_XRAY / "manifest.csv").is_file():
        return [], []
    samples = list(iter_fracture_xray(FRACTURE_XRAY))
    splits = grouped_stratified_split(samples, cfg.train.split_fractions, cfg.train.seed)
    val = [s for s, split in zip(samples, splits, strict=True) if split == "val"]
    if limit:
        val = val[:: max(1, len(val) // limit)][:limit]
    return [s.path.read_bytes() for s in val], [s.target for s in val]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--backend", default="onnx", choices=["onnx"])
    parser.add_argument("--limit", type=int, help="at most this many validation images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cfg = OrthoVisionConfig()
    ckpt = load_checkpoint(args.checkpoint or checkpoint_path(cfg))
    model = ckpt.model.eval()
    pre = Preprocessor(ckpt.config.preprocess)

    started = time.time()
    val_bytes, val_targets = validation_images(cfg, args.limit)
    extra = [s.data for s in fullsize(12).samples]
    pixels = [model_pixels(b, cfg, pre) for b in val_bytes + extra]
    x_all = torch.from_numpy(np.stack(pixels))

    from orthovision.model.onnx_export import exported_branch

    candidates = {
        name: exported_branch(
            model.branches[name],
            weights_sha256=ckpt.card["weights_sha256"],
            branch=name,
            image_size=ckpt.config.preprocess.image_size,
            threads=args.threads,
        )
        for name in model.branch_names
    }
    ref_logits: dict[str, list[torch.Tensor]] = {n: [] for n in model.branch_names}
    cand_logits: dict[str, list[torch.Tensor]] = {n: [] for n in model.branch_names}
    with torch.inference_mode():
        for start in range(0, len(x_all), args.batch):
            x = x_all[start : start + args.batch]
            for name in model.branch_names:
                ref_logits[name].append(model.branch_forward(name, x))
                mean, std = model._norm_values[name]
                cand_logits[name].append(
                    torch.from_numpy(candidates[name](to_model_input(x, mean, std))[1])
                )
        ref = {n: torch.cat(v) for n, v in ref_logits.items()}
        cand = {n: torch.cat(v) for n, v in cand_logits.items()}
        p_ref, p_cand = model.fuse(ref).numpy(), model.fuse(cand).numpy()

    temperature = float(model.temperature)
    branches = {}
    for name in model.branch_names:
        a = torch.softmax(ref[name] / temperature, -1).numpy()
        b = torch.softmax(cand[name] / temperature, -1).numpy()
        branches[name] = {
            "top1_agreement": round(float((a.argmax(1) == b.argmax(1)).mean()), 5),
            "max_abs_prob_diff": float(np.abs(a - b).max()),
            "max_abs_logit_diff": float((ref[name] - cand[name]).abs().max()),
        }
    n_val = len(val_targets)
    result = {
        "checkpoint": str(ckpt.path),
        "trained": bool(ckpt.card.get("trained")),
        "weights_sha256": ckpt.card["weights_sha256"],
        "backend": args.backend,
        "images": {"validation": n_val, "fullsize_and_dicom": len(extra)},
        "dicom_dir_present": DICOM_DIR.is_dir(),
        "fused": {
            "top1_agreement": round(float((p_ref.argmax(1) == p_cand.argmax(1)).mean()), 5),
            "max_abs_prob_diff": float(np.abs(p_ref - p_cand).max()),
        },
        "branches": branches,
        "seconds": round(time.time() - started, 1),
    }
    if n_val:
        y = np.asarray(val_targets)
        acc_ref = float((p_ref[:n_val].argmax(1) == y).mean())
        acc_cand = float((p_cand[:n_val].argmax(1) == y).mean())
        result["validation_accuracy"] = {
            "fp32_torch": round(100 * acc_ref, 2),
            args.backend: round(100 * acc_cand, 2),
            "difference_points": round(100 * (acc_cand - acc_ref), 2),
            "classes_present": sorted({CLASSES[t] for t in val_targets}),
        }
        result["accepted"] = abs(acc_cand - acc_ref) * 100 <= 0.5
    print(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(result, separators=(",", ":")))


if __name__ == "__main__":
    main()
