"""Evaluation of a checkpoint: the paper's Table 05 columns and more, honestly reported.

Per class precision, recall (= sensitivity), F1, accuracy (one-vs-rest), specificity;
macro and weighted means; one-vs-rest ROC AUC with a bootstrap 95% CI that resamples
*groups* (near-duplicate radiographs are not independent evidence); confusion matrix;
calibration (ECE, reliability diagram); image-level and group-level (majority vote per
group) results; the fusion ablation of the paper's section 5.3. A class with no samples
in the evaluated data is reported as such, never with a made-up number.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from orthovision.evaluation.markdown import markdown_report
from orthovision.evaluation.metrics import at_threshold, operating_point
from orthovision.evaluation.plots import plot_confusion, plot_history, plot_reliability, plot_roc
from orthovision.evaluation.results import EvaluationReport, compute_report
from orthovision.model.probabilities import fused_probabilities

# Model outputs


@torch.inference_mode()
@torch.inference_mode()
def branch_outputs(
    model, pixels: np.ndarray, batch_size: int = 64
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(penultimate features (N, D), logits (N, C)) per branch for uint8 (N, 1, S, S)
    inputs, in one pass, model in eval mode."""
    from orthovision.model.backbones import branch_features

    was_training = model.training
    model.eval()
    feats: dict[str, list[np.ndarray]] = {n: [] for n in model.branch_names}
    logits: dict[str, list[np.ndarray]] = {n: [] for n in model.branch_names}
    for start in range(0, len(pixels), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch_size]))
        for name in model.branch_names:
            f, lg = branch_features(model.branches[name], model.branch_input(name, x))
            feats[name].append(f.float().cpu().numpy())
            logits[name].append(lg.float().cpu().numpy())
    model.train(was_training)
    num_classes = len(model.cfg.classes)

    def stack(parts: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
        return {
            n: np.concatenate(v) if v else np.zeros((0, num_classes), np.float32)
            for n, v in parts.items()
        }

    return stack(feats), stack(logits)


def predict_logits(
    model, pixels: np.ndarray, batch_size: int = 64, device: torch.device | str = "cpu"
) -> dict[str, np.ndarray]:
    """Branch logits (N, C) per branch (each branch runs on its own parameters' device)."""
    return branch_outputs(model, pixels, batch_size)[1]


# Checkpoint on a dataset folder


def split_samples(ckpt, data_path: Path | str, split: str, cache_dir=None, progress=False):
    """(samples, uint8 pixels, cleaning report) of a dataset folder, through the serving
    pipeline and the pixel cache; `split` "all" or one recorded in the checkpoint's
    splits.csv (by sha256), so the held-out images stay the held-out ones."""
    from orthovision.config import OrthoVisionConfig
    from orthovision.datasets.cleaning import PixelCache, clean_and_cache
    from orthovision.datasets.sources import detect_source, iter_source
    from orthovision.datasets.splits import read_split_csv

    cfg = OrthoVisionConfig.model_validate(
        {"model": ckpt.config.model.model_dump(), "preprocess": ckpt.config.preprocess.model_dump()}
    )
    samples = list(iter_source(detect_source(data_path)))
    cache_root = cache_dir if cache_dir is not None else cfg.train.cache_dir
    cache = PixelCache(cache_root or None, cfg.preprocess.param_hash())
    kept, pixels, cleaning = clean_and_cache(samples, cfg, cache, progress=progress)
    if split != "all":
        split_file = Path(ckpt.path) / "splits.csv"
        if not split_file.is_file():
            raise FileNotFoundError(f"{split_file} not found: cannot select split {split!r}")
        membership = read_split_csv(split_file)
        idx = [i for i, s in enumerate(kept) if membership.get(s.sha256) == split]
        kept, pixels = [kept[i] for i in idx], pixels[idx]
    return kept, pixels, cleaning


def evaluate_checkpoint(
    checkpoint: Path | str,
    data_path: Path | str,
    out_dir: Path | str | None = None,
    *,
    split: str = "all",
    n_bootstrap: int = 1000,
    progress: bool = False,
    cache_dir: str | None = None,
    seed: int = 0,
) -> EvaluationReport:
    """Evaluate a checkpoint folder on a dataset folder (any supported layout).

    `split`: "all" images of the folder, or "train"/"val"/"test" as recorded in the
    checkpoint's splits.csv (by sha256), so the held-out images stay the held-out ones.
    """
    from orthovision.model.checkpoint import load_checkpoint
    from orthovision.safety.ood import load_for_checkpoint

    ckpt = load_checkpoint(checkpoint)
    card = ckpt.card
    kept, pixels, cleaning = split_samples(ckpt, data_path, split, cache_dir, progress)
    classes = list(ckpt.config.model.classes)
    unknown = {s.label for s in kept} - set(classes)
    if unknown:
        raise ValueError(f"labels {sorted(unknown)} are not among the checkpoint's classes")
    model = ckpt.model
    features, logits = branch_outputs(model, pixels)  # features: the OOD table below
    y_true = np.asarray([classes.index(s.label) for s in kept], dtype=np.int64)
    groups = [s.group for s in kept]
    training = card.get("training", {})
    val_acc = {
        n: v["accuracy"]
        for n, v in training.get("validation", {}).items()
        if n in model.branch_names
    }
    report = compute_report(
        logits,
        y_true,
        groups,
        classes,
        fusion_weights=model.fusion_weights.numpy(),
        temperature=float(model.temperature),
        branch_val_accuracy=val_acc or None,
        abstain_threshold=ckpt.config.fusion.abstain_threshold,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )
    probs = fused_probabilities(logits, model.fusion_weights.numpy(), float(model.temperature))
    if "fracture" in classes and len(y_true):
        k = classes.index("fracture")
        pos = y_true == k
        if pos.any() and not pos.all():
            report.extra["fracture_operating_point"] = operating_point(pos, probs[:, k], 0.85)
            op = card.get("operating_point")
            if op and op.get("class") == "fracture":
                report.extra["card_operating_point"] = at_threshold(pos, probs[:, k], op)
    detector = load_for_checkpoint(checkpoint, card)
    if detector is not None:
        from orthovision.model.local import LocalPredictor
        from orthovision.safety.fitting import ood_separation

        local = LocalPredictor(ckpt)
        report.extra["ood"] = ood_separation(
            model,
            detector,
            card["ood"]["threshold"],
            pixels,
            lambda b: local.prepare(b).pixels,
            test_outputs=(features, logits),
        )
    report.extra.update(
        {
            "checkpoint": str(checkpoint),
            "data": str(data_path),
            "split": split,
            "images": len(kept),
            "groups": len(set(groups)),
            "cleaning": cleaning.summary(),
            "validated_classes": card.get("validated_classes", []),
            "not_validated_classes": [
                c for c in classes if c not in card.get("validated_classes", [])
            ],
        }
    )
    if out_dir is not None:
        write_outputs(report, Path(out_dir), checkpoint=Path(checkpoint))
    return report


def write_outputs(report: EvaluationReport, out_dir: Path, checkpoint: Path | None = None) -> None:
    """metrics.json, confusion/ROC/reliability/training-curve PNGs and report.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
    plot_confusion(
        report.image["confusion_matrix"],
        report.classes,
        out_dir / "confusion_matrix.png",
        "Confusion matrix (image level)",
    )
    plot_confusion(
        report.group["confusion_matrix"],
        report.classes,
        out_dir / "confusion_matrix_group.png",
        "Confusion matrix (group level)",
    )
    plot_roc(report.roc_curves, report.image["roc_auc"], out_dir / "roc.png")
    plot_reliability(report.image["calibration"], out_dir / "reliability.png")
    history_file = checkpoint / "history.json" if checkpoint else None
    if history_file is not None and history_file.is_file():
        history = json.loads(history_file.read_text())
        if history:
            plot_history(history, out_dir / "training_curves.png")
    context = {
        k: report.extra[k]
        for k in ("checkpoint", "data", "split", "images", "groups")
        if k in report.extra
    }
    (out_dir / "report.md").write_text(markdown_report(report, "OrthoVision evaluation", context))
