"""The road of one image, as plain functions: bytes -> Prepared (CPU stage) -> Prediction.

Serve's deployments call the same functions stage by stage; the CLI and the naive
benchmark baseline run them in one process through LocalPredictor (model/local.py).
Torch-free: the ingress, Preprocessor and Fusion replicas import it, and never torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from orthovision.config import FusionConfig, OrthoVisionConfig
from orthovision.errors import InputError
from orthovision.imaging.decode import decode_radiograph
from orthovision.imaging.pixels import DecodedImage
from orthovision.imaging.preprocess import Preprocessor
from orthovision.imaging.quality import assess_quality
from orthovision.model.decision import Decision, decide
from orthovision.model.probabilities import fused_probabilities, softmax
from orthovision.safety.scope import out_of_scope
from orthovision.schema import Prediction


@dataclass(frozen=True)
class Prepared:
    """Output of the CPU stage: the uint8 model input plus what the result reports about it."""

    pixels: np.ndarray  # (1, S, S) uint8
    input_info: dict
    quality: dict
    # DICOM source UIDs and patient/study attributes (DecodedImage.dicom_source): for DICOM
    # outputs only, never in the public result, repr or logs.
    dicom_source: dict[str, str] | None = field(default=None, repr=False, compare=False)
    # (left, top, width, height) the image fills in `pixels` (the letterbox's inner box):
    # where a heat map of these pixels lies on the source image.
    content_box: tuple[int, int, int, int] | None = None
    # A DICOM input's display rendering (PNG, imaging/display.py), made only when the
    # client asks (the viewer): a browser cannot show DICOM itself.
    display_png: bytes | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class PreparedBatch:
    """The CPU stage's output for several images, as it travels between deployments.

    One stacked uint8 array holds the valid images' pixels (what a backbone forwards as is);
    `items` keeps every input's outcome in order: a Prepared whose pixels are a row of
    `pixels`, or the InputError that rejected it (so a bad image never fails its batch).
    """

    pixels: np.ndarray  # (V, 1, S, S) uint8, V = number of valid items
    items: tuple[Prepared | InputError, ...]

    @classmethod
    def of(cls, items: Sequence[Prepared | InputError], image_size: int) -> PreparedBatch:
        """`image_size` shapes the array even when no item is valid, so that batches from
        several calls always concatenate."""
        valid = [i.pixels for i in items if isinstance(i, Prepared)]
        pixels = np.stack(valid) if valid else np.zeros((0, 1, image_size, image_size), np.uint8)
        return cls(pixels, _link(items, pixels))

    def __len__(self) -> int:
        return len(self.items)

    # On the wire the pixels travel once (the stacked array), not once more per item.
    def __getstate__(self) -> dict:
        items = tuple(replace(i, pixels=None) if isinstance(i, Prepared) else i for i in self.items)
        return {"pixels": self.pixels, "items": items}

    def __setstate__(self, state: dict) -> None:
        object.__setattr__(self, "pixels", state["pixels"])
        object.__setattr__(self, "items", _link(state["items"], state["pixels"]))


def _link(items: Sequence[Prepared | InputError], pixels: np.ndarray) -> tuple:
    rows = iter(pixels)
    return tuple(replace(i, pixels=next(rows)) if isinstance(i, Prepared) else i for i in items)


@dataclass(frozen=True)
class Classified:
    """The fusion stage's answer for one valid image, as it travels back to the ingress.

    `result` is the v1 Prediction already dumped to JSON (where it is made, off the ingress's
    CPU); the other fields are stored with the record but never answered (docs/DESIGN.md: no
    patient data outside the objects that need it).
    """

    result: dict
    created_at: float
    dicom_source: dict[str, str] | None = field(default=None, repr=False, compare=False)
    # The 224x224 grey model input as base64 PNG, kept for DICOM inputs only: a PACS may ask
    # for the heat-map Secondary Capture later, and the explanation is made from it.
    model_input_png: str | None = field(default=None, repr=False, compare=False)
    # Prepared.display_png as base64, for GET /v1/predictions/{id}/image.png.
    display_png: str | None = field(default=None, repr=False, compare=False)

    def private(self, tenant: str) -> dict:
        """The record's private part (schema.PRIVATE_KEY), owned by `tenant`."""
        part: dict = {"created_at": self.created_at, "dicom_source": self.dicom_source}
        if self.model_input_png is not None:
            part["model_input_png"] = self.model_input_png
        if self.display_png is not None:
            part["display_png"] = self.display_png
        return {**part, "tenant": tenant}


# One item's outcome of a batch, in order: its answer, or the InputError that rejected it.
ItemOutcome = Classified | InputError


def decode_for_model(data: bytes, cfg: OrthoVisionConfig) -> DecodedImage:
    """Reduced-size decode to the smallest image that still covers the model input."""
    return decode_radiograph(data, cfg.decode, target_side=cfg.preprocess.image_size)


def model_pixels(data: bytes, cfg: OrthoVisionConfig, preprocessor: Preprocessor) -> np.ndarray:
    """bytes -> uint8 (1, S, S), no quality gate: the training datasets' path.

    Serving's `prepare` runs the very same two calls, so train and serve tensors are
    byte-identical (a test proves it)."""
    return preprocessor(decode_for_model(data, cfg).pixels)


def prepare(data: bytes, cfg: OrthoVisionConfig, preprocessor: Preprocessor) -> Prepared:
    """decode -> validate -> CLAHE/resize. Raises an InputError subclass for a bad input."""
    decoded = decode_for_model(data, cfg)
    report = assess_quality(decoded, cfg.quality)
    report.raise_if_rejected()
    return Prepared(
        preprocessor(decoded.pixels),
        decoded.metadata(),
        report.to_dict(),
        decoded.dicom_source,
        preprocessor.content_box(*decoded.pixels.shape),
    )


def model_info(card: Mapping) -> dict:
    return {
        "name": card["name"],
        "version": card["version"],
        "sha256": card["weights_sha256"],
        "trained": bool(card.get("trained", False)),
    }


def safety_gate(
    decision: Decision, prepared: Prepared, card: Mapping, ood_score: float | None
) -> Decision:
    """Abstain, whatever the probabilities say, on anatomy outside the card's scope (DICOM
    header) and on images far from the training data (OOD score over the card's
    threshold). The probabilities stay in the result, marked by the abstention."""
    description = (prepared.dicom_source or {}).get("StudyDescription")
    part = out_of_scope(prepared.input_info.get("body_part"), card, description)
    if part is not None:
        reason = (
            f"out_of_scope: body part {part} is outside this model's training data "
            f"({(card.get('scope') or {}).get('anatomy', 'see the model card')})"
        )
        return replace(decision, label=None, abstained=True, reason=reason, code="out_of_scope")
    threshold = (card.get("ood") or {}).get("threshold")
    if threshold is not None and ood_score is not None and ood_score > threshold:
        reason = (
            f"out_of_distribution: the image is far from the training data "
            f"(OOD score {ood_score:.2f} > {threshold:.2f})"
        )
        return replace(
            decision, label=None, abstained=True, reason=reason, code="out_of_distribution"
        )
    return decision


def assemble_prediction(
    request_id: str,
    prepared: Prepared,
    branch_logits: Mapping[str, np.ndarray],
    fusion_weights: Mapping[str, float],
    temperature: float,
    card: Mapping,
    fusion_cfg: FusionConfig,
    explanation_url: str | None = None,
    ood_score: float | None = None,
) -> Prediction:
    """Fuse one image's branch logits (C,) into the v1 result, applying the decision rule
    and the safety gate (scope from the header, OOD score from the features)."""
    classes = list(card["classes"])
    logits = {n: np.asarray(lg, dtype=np.float32)[None] for n, lg in branch_logits.items()}
    weights = [fusion_weights[n] for n in logits]
    fused = fused_probabilities(logits, weights, temperature)[0].tolist()
    branches = {
        n: dict(zip(classes, softmax(lg, temperature)[0].tolist(), strict=True))
        for n, lg in logits.items()
    }
    validated = list(card.get("validated_classes", []))
    operating_point = card.get("operating_point")
    decision = decide(fused, validated, fusion_cfg.abstain_threshold, classes, operating_point)
    decision = safety_gate(decision, prepared, card, ood_score)
    return Prediction(
        request_id=request_id,
        label=decision.label,
        abstained=decision.abstained,
        abstain_reason=decision.reason,
        abstain_code=decision.code,
        ood_score=None if ood_score is None or not math.isfinite(ood_score) else ood_score,
        probabilities=dict(zip(classes, fused, strict=True)),
        branches=branches,
        fusion_weights=dict(fusion_weights),
        validated_classes=validated,
        decision_threshold=(operating_point or {}).get("threshold"),
        quality=prepared.quality,
        input=prepared.input_info,
        model=model_info(card),
        explanation_url=explanation_url,
        study_instance_uid=(prepared.dicom_source or {}).get("StudyInstanceUID") or None,
    )
