"""How well the OOD score says "not for me": AUROC against out-of-distribution sets built
offline, and the in-distribution abstention rate (docs/SAFETY.md, `orthovision evaluate`).

Every set goes through the serving pipeline (decode, quality, CLAHE, letterbox) where it
starts as a file; the derived radiograph sets (inverted, cropped) are made from the test
split's model inputs. The energy score (a logit-only alternative, Liu et al. 2020) is
measured beside the Mahalanobis score that the service uses.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np

from orthovision.errors import InputError
from orthovision.paths import SHARED_DATA
from orthovision.safety.ood import OODDetector

SHARED_DICOM = SHARED_DATA / "dicom"
NON_BONE_DICOMS = ("RG1_J2KI.dcm", "JPEG2KLossless_1s_1f_u_16_16.dcm")  # chest, phantom
TUMOUR_CASE = "RG3_J2KR.dcm"  # a benign bone tumour of the distal tibia: reported alone


def _png(grey: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    return buf.getvalue()


def natural_photographs() -> list[bytes]:
    """scikit-image's bundled sample photographs (no download), greyscale, whole and halved."""
    from skimage import color, data, util

    out = []
    for name in (
        "camera",
        "astronaut",
        "coffee",
        "chelsea",
        "rocket",
        "coins",
        "moon",
        "horse",
        "clock",
        "immunohistochemistry",
        "hubble_deep_field",
        "page",
    ):
        try:
            img = getattr(data, name)()
        except Exception:  # noqa: BLE001 - a sample that needs a download is skipped
            continue
        if img.ndim == 3:
            img = color.rgb2gray(img[..., :3])
        grey = util.img_as_ubyte(img)
        w = grey.shape[1]
        out += [_png(grey), _png(grey[:, : w // 2]), _png(grey[:, w // 2 :])]
    return out


def documents(n: int = 12, seed: int = 0) -> list[bytes]:
    """Rendered text pages: scanned letters and forms are a common wrong upload."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    words = "patient report radiograph findings wrist fracture date signature clinic".split()
    pages = []
    for i in range(n):
        img = Image.new("L", (600 + 40 * i, 800), 255)
        draw = ImageDraw.Draw(img)
        for line in range(30):
            text = " ".join(rng.choice(words, size=8))
            draw.text((30, 20 + line * 25), text, fill=int(rng.integers(0, 80)))
        pages.append(_png(np.asarray(img)))
    return pages


def _prepared_pixels(files: list[bytes], prepare: Callable[[bytes], np.ndarray]) -> np.ndarray:
    """Model inputs of the files the pipeline accepts (a rejected one never reaches a model)."""
    kept = []
    for data in files:
        try:
            kept.append(prepare(data))
        except InputError:
            continue
    return np.stack(kept) if kept else np.zeros((0, 1, 224, 224), np.uint8)


def energy(logits: dict[str, np.ndarray]) -> np.ndarray:
    """Mean over branches of -logsumexp(logits): higher = less familiar."""
    from scipy.special import logsumexp

    return np.mean([-logsumexp(lg, axis=1) for lg in logits.values()], axis=0)


def ood_separation(
    model,
    detector: OODDetector,
    threshold: float,
    test_pixels: np.ndarray,
    prepare: Callable[[bytes], np.ndarray],
    shared_dicom: Path = SHARED_DICOM,
    test_outputs: tuple[dict, dict] | None = None,
) -> dict:
    """AUROC of the OOD score (and of the energy score) per OOD set against the test split,
    the fraction of each set abstained on, and the in-distribution abstention rate.
    `test_outputs`: the test pixels' (features, logits) when the caller has them already."""
    from sklearn.metrics import roc_auc_score

    from orthovision.evaluation.run import branch_outputs

    def from_outputs(features: dict, logits: dict) -> tuple[np.ndarray, np.ndarray]:
        return detector.score(features), energy(logits)

    def scores(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not len(pixels):
            return np.zeros(0), np.zeros(0)
        return from_outputs(*branch_outputs(model, pixels))

    rng = np.random.default_rng(0)
    sample = test_pixels[rng.permutation(len(test_pixels))[:120]]
    h = sample.shape[-1]
    crop = sample[..., h * 3 // 8 : h * 5 // 8, h * 3 // 8 : h * 5 // 8]
    cropped = np.repeat(np.repeat(crop, 4, axis=-1), 4, axis=-2)
    sets: dict[str, np.ndarray] = {
        "natural photographs (scikit-image samples)": _prepared_pixels(
            natural_photographs(), prepare
        ),
        "rendered documents": _prepared_pixels(documents(), prepare),
        "inverted test radiographs": 255 - sample,
        "central 25% crops of test radiographs": cropped,
    }
    dicoms = [shared_dicom / n for n in NON_BONE_DICOMS if (shared_dicom / n).is_file()]
    if dicoms:
        sets["non-bone DICOMs (chest CR, DX phantom)"] = _prepared_pixels(
            [p.read_bytes() for p in dicoms], prepare
        )
    in_maha, in_energy = from_outputs(*test_outputs) if test_outputs else scores(test_pixels)
    rows = []
    for name, pixels in sets.items():
        maha, en = scores(pixels)
        row = {"set": name, "n": int(len(pixels))}
        if len(pixels):
            y = np.r_[np.zeros(len(in_maha)), np.ones(len(maha))]
            row["auroc_mahalanobis"] = float(roc_auc_score(y, np.r_[in_maha, maha]))
            row["auroc_energy"] = float(roc_auc_score(y, np.r_[in_energy, en]))
            row["abstained"] = float(np.mean(maha > threshold))
        rows.append(row)
    report = {
        "threshold": threshold,
        "in_distribution": {
            "n": int(len(in_maha)),
            "abstained": float(np.mean(in_maha > threshold)) if len(in_maha) else None,
            "median_score": float(np.median(in_maha)) if len(in_maha) else None,
        },
        "sets": rows,
    }
    tumour = shared_dicom / TUMOUR_CASE
    if tumour.is_file():
        pixels = _prepared_pixels([tumour.read_bytes()], prepare)
        if len(pixels):
            score = float(scores(pixels)[0][0])
            report["tumour_case"] = {
                "file": TUMOUR_CASE,
                "score": score,
                "abstained": score > threshold,
            }
    return report


def scope_for(card: dict) -> dict:
    """The card's `scope`: the anatomy its datasets document (orthovision/safety/scope.py)."""
    from orthovision.safety.scope import FRACTURE_XRAY_SCOPE, NOT_EXTREMITY_BODY_PARTS

    names = [d.get("name") for d in (card.get("data") or {}).get("datasets", [])]
    if names == ["fracture-xray"]:
        return dict(FRACTURE_XRAY_SCOPE)
    return {
        "anatomy": f"bone radiographs of the training datasets ({', '.join(map(str, names))})",
        "source": "the datasets' documentation",
        "out_of_scope_body_parts": list(NOT_EXTREMITY_BODY_PARTS),
    }


def attach_safety(
    card: dict,
    model,
    train_px: np.ndarray,
    train_labels: np.ndarray,
    val_px: np.ndarray,
    out_dir: Path,
) -> dict:
    """Fit the OOD detector (train split features, validation threshold), write it beside
    the weights, and add `ood`, `scope` and `drift_baseline` to the card (returned)."""
    from orthovision.evaluation.run import branch_outputs
    from orthovision.model.probabilities import fused_probabilities
    from orthovision.safety.ood import fit_for_checkpoint

    train_features, _ = branch_outputs(model, train_px)
    val_features, val_logits = branch_outputs(model, val_px)  # one pass: features and logits
    section, val_scores = fit_for_checkpoint(
        train_features, np.asarray(train_labels), val_features, out_dir
    )
    card["ood"] = section
    card["scope"] = scope_for(card)
    probs = fused_probabilities(val_logits, model.fusion_weights.numpy(), float(model.temperature))
    card["drift_baseline"] = drift_baseline(probs, val_scores, card)
    return card


def fit_checkpoint_ood(
    checkpoint: Path | str, data_path: Path | str, cache_dir: str | None = None
) -> dict:
    """attach_safety for a trained checkpoint folder, on its own recorded splits (the
    weights and their sha256 are untouched). Returns the `ood` section."""
    import json

    from orthovision.evaluation.run import split_samples
    from orthovision.model.card import CARD_FILE
    from orthovision.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    classes = list(ckpt.config.model.classes)
    train, train_px, _ = split_samples(ckpt, data_path, "train", cache_dir)
    _, val_px, _ = split_samples(ckpt, data_path, "val", cache_dir)
    labels = np.asarray([classes.index(s.label) for s in train])
    card_path = Path(checkpoint) / CARD_FILE
    card = json.loads(card_path.read_text())
    card = attach_safety(card, ckpt.model, train_px, labels, val_px, Path(checkpoint))
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return card["ood"]


def drift_baseline(probs: np.ndarray, ood_scores: np.ndarray, card: dict) -> dict:
    """What production should look like, from the validation split through the serving
    decision rule: label mix (with 'abstained'), abstention rate (all and by OOD), mean top
    probability, OOD score quantiles. The drift alerts compare live rates with these."""
    from orthovision.model.decision import decide

    classes = list(card["classes"])
    validated = card.get("validated_classes", [])
    threshold = (card.get("ood") or {}).get("threshold", np.inf)
    labels = []
    for p, score in zip(probs, ood_scores, strict=True):
        d = decide(p.tolist(), validated, 0.5, classes, card.get("operating_point"))
        labels.append("abstained" if d.abstained or score > threshold else d.label)
    n = max(len(labels), 1)
    mix = {c: labels.count(c) / n for c in [*validated, "abstained"]}
    return {
        "split": "val",
        "n": len(labels),
        "label_mix": mix,
        "abstain_rate": mix["abstained"],
        "ood_abstain_rate": float(np.mean(ood_scores > threshold)) if len(ood_scores) else 0.0,
        "mean_top_probability": float(probs.max(1).mean()) if len(probs) else None,
        "ood_score_median": float(np.median(ood_scores)) if len(ood_scores) else None,
    }
