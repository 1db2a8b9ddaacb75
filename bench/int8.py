"""int8 against fp32 ONNX Runtime: make the int8 graphs, then measure what they cost.

    python -m bench.int8 --data ../shared/data/fracture-xray [--checkpoint models/default]

1. calibrates on training-split images (one per near-duplicate group, at most --calib),
   and keeps a branch's int8 graph only if on the validation split its top-1 agrees with
   fp32 on >= BRANCH_AGREEMENT_MIN of the images (a branch whose graph fails stays fp32:
   the replica then serves fp32 ONNX for it); writes `int8/<branch>.onnx` + manifest into
   the checkpoint folder;
2. on the test split: fracture ROC AUC of the fused, calibrated probabilities with fp32 and
   with int8 graphs, and how often the service's label (decision rule, operating point,
   abstentions) is the same;
3. model-only speed of both engines per branch at batch 8 on this machine's CPUs.
The acceptance rule (issue 19): AUC drop <= 0.005 and label agreement >= 0.99.
The last stdout line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from orthovision.datasets.splits import one_per_group
from orthovision.model.quantize import INT8_DIR
from orthovision.paths import checkpoint_dir

AUC_DROP_MAX = 0.005
AGREEMENT_MIN = 0.99
BRANCH_AGREEMENT_MIN = 0.99


def quantize_checkpoint(
    ckpt, data: Path, calib: int, threads: int, gate: float = BRANCH_AGREEMENT_MIN
) -> dict:
    """Step 1: int8 graphs of the branches that keep their top-1 on the validation split;
    the manifest. Returns the manifest's calibration record."""
    import torch

    from orthovision.evaluation.run import split_samples
    from orthovision.model.onnx_export import exported_branch
    from orthovision.model.quantize import INT8_DIR, quantize_graph, write_manifest
    from orthovision.model.tensors import to_model_input

    train, train_pixels, _ = split_samples(ckpt, data, "train")
    chosen = one_per_group(train, calib)
    _, val_pixels, _ = split_samples(ckpt, data, "val")
    model = ckpt.model.eval()
    folder = Path(ckpt.path) / INT8_DIR
    record: dict = {"split": "train", "images": len(chosen), "one_per_group": True}
    record["val_top1_agreement"] = {}
    for name in model.branch_names:
        common = dict(
            weights_sha256=ckpt.card["weights_sha256"],
            branch=name,
            image_size=ckpt.config.preprocess.image_size,
            threads=threads,
        )
        fp32 = exported_branch(model.branches[name], **common)
        mean, std = model._norm_values[name]

        def inputs(pixels, rows, mean=mean, std=std):
            return (to_model_input(torch.from_numpy(pixels[r]), mean, std) for r in rows)

        graph = folder / f"{name}.onnx"
        calibration = [slice(i, i + 1) for i in chosen]
        quantize_graph(fp32.path, graph, (x.numpy() for x in inputs(train_pixels, calibration)))
        int8 = exported_branch(model.branches[name], graph=graph, **common)
        batches = [slice(i, i + 16) for i in range(0, len(val_pixels), 16)]
        same = [fp32(x)[1].argmax(1) == int8(x)[1].argmax(1) for x in inputs(val_pixels, batches)]
        agreement = float(np.concatenate(same).mean())
        record["val_top1_agreement"][name] = round(agreement, 4)
        if agreement < gate:
            graph.unlink()  # this branch stays fp32
    record["int8_branches"] = sorted(p.stem for p in folder.glob("*.onnx"))
    write_manifest(ckpt.path, ckpt.card["weights_sha256"], record)
    return record


def engines(ckpt, threads: int) -> dict[str, dict]:
    from orthovision.model.onnx_export import exported_branch
    from orthovision.model.quantize import int8_graph

    out: dict[str, dict] = {"fp32": {}, "int8": {}}
    for name in ckpt.model.branch_names:
        common = dict(
            weights_sha256=ckpt.card["weights_sha256"],
            branch=name,
            image_size=ckpt.config.preprocess.image_size,
            threads=threads,
        )
        out["fp32"][name] = exported_branch(ckpt.model.branches[name], **common)
        # A branch without an int8 graph runs fp32 here, as a replica would serve it.
        graph = int8_graph(ckpt.path, name, ckpt.card["weights_sha256"])
        out["int8"][name] = exported_branch(ckpt.model.branches[name], graph=graph, **common)
    return out


def test_split_figures(ckpt, data: Path, runners: dict[str, dict]) -> dict:
    """Step 2: fracture AUC of both engines and the agreement of the service's labels."""
    import torch
    from sklearn.metrics import roc_auc_score

    from orthovision.evaluation.run import split_samples
    from orthovision.model.decision import decide
    from orthovision.model.probabilities import fused_probabilities
    from orthovision.model.tensors import to_model_input

    kept, pixels, _ = split_samples(ckpt, data, "test")
    card, model = ckpt.card, ckpt.model
    classes = list(card["classes"])
    fracture = np.array([s.label == "fracture" for s in kept])
    weights = [card["fusion_weights"][n] for n in model.branch_names]
    temperature = float(card["temperature"])
    out: dict = {"images": len(kept)}
    labels = {}
    for engine, branches in runners.items():
        logits = {}
        for name, run in branches.items():
            mean, std = model._norm_values[name]
            parts = [
                run(to_model_input(torch.from_numpy(pixels[i : i + 16]), mean, std))[1]
                for i in range(0, len(pixels), 16)
            ]
            logits[name] = np.concatenate(parts)
        probs = fused_probabilities(logits, weights, temperature)
        out[f"{engine}_fracture_auc"] = round(
            float(roc_auc_score(fracture, probs[:, classes.index("fracture")])), 4
        )
        labels[engine] = [
            decide(
                p,
                card.get("validated_classes", []),
                ckpt.config.fusion.abstain_threshold,
                classes,
                card.get("operating_point"),
            ).label
            for p in probs
        ]
    same = np.mean([a == b for a, b in zip(labels["fp32"], labels["int8"], strict=True)])
    out["label_agreement"] = round(float(same), 4)
    out["auc_drop"] = round(out["fp32_fracture_auc"] - out["int8_fracture_auc"], 4)
    return out


def speed(ckpt, runners: dict[str, dict], seconds: float) -> dict:
    """Step 3: images per second of each engine per branch, batch 8, model only."""
    import torch

    x = torch.randn(8, 3, 224, 224)
    out: dict = {}
    for engine, branches in runners.items():
        for name, run in branches.items():
            run(x)  # warm-up
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                run(x)
                n += len(x)
            out.setdefault(engine, {})[name] = round(n / (time.perf_counter() - t0), 2)
        # Both branches run for every image: the ensemble's rate is the harmonic sum.
        out[engine]["ensemble"] = round(1 / sum(1 / v for v in out[engine].values()), 2)
    out["ensemble_int8_over_fp32"] = round(out["int8"]["ensemble"] / out["fp32"]["ensemble"], 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=checkpoint_dir())
    p.add_argument("--data", type=Path, required=True, help="the dataset it was trained on")
    p.add_argument("--calib", type=int, default=64, help="calibration images (train split)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0, help="per speed point")
    p.add_argument("--skip-quantize", action="store_true", help="measure existing graphs")
    p.add_argument(
        "--gate",
        type=float,
        default=BRANCH_AGREEMENT_MIN,
        help="validation top-1 agreement a branch's graph needs to be kept (0: keep all, to "
        "measure what int8 would cost)",
    )
    args = p.parse_args()

    from orthovision.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    result: dict = {"cpu": platform.processor() or platform.machine()}
    if not args.skip_quantize:
        result["calibration"] = quantize_checkpoint(
            ckpt, args.data, args.calib, args.threads, args.gate
        )
    runners = engines(ckpt, args.threads)
    result["test"] = test_split_figures(ckpt, args.data, runners)
    result["speed_img_per_s"] = speed(ckpt, runners, args.seconds)
    test = result["test"]
    # Accepted only with at least one int8 branch: without, "int8" ran fp32 throughout.
    int8_branches = [n for n, run in runners["int8"].items() if INT8_DIR in run.path.parts]
    result["int8_branches"] = int8_branches
    result["accepted"] = bool(
        int8_branches
        and test["auc_drop"] <= AUC_DROP_MAX
        and test["label_agreement"] >= AGREEMENT_MIN
    )
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
