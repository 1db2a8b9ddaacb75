"""The road of one image, as plain functions: bytes -> Prepared (CPU stage) -> Prediction.

Serve's deployments call the same functions stage by stage; the CLI and the naive
benchmark baseline run them in one process through LocalPredictor.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from orthovision.checkpoint import Checkpoint
from orthovision.config import FusionConfig, OrthoVisionConfig
from orthovision.errors import InputError
from orthovision.fusion import decide, fuse_logits
from orthovision.io import DecodedImage, decode_radiograph
from orthovision.preprocess import Preprocessor
from orthovision.quality import assess_quality
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
        preprocessor(decoded.pixels), decoded.metadata(), report.to_dict(), decoded.dicom_source
    )


def model_info(card: Mapping) -> dict:
    return {
        "name": card["name"],
        "version": card["version"],
        "sha256": card["weights_sha256"],
        "trained": bool(card.get("trained", False)),
    }


def assemble_prediction(
    request_id: str,
    prepared: Prepared,
    branch_logits: Mapping[str, torch.Tensor | np.ndarray],
    fusion_weights: Mapping[str, float],
    temperature: float,
    card: Mapping,
    fusion_cfg: FusionConfig,
    explanation_url: str | None = None,
) -> Prediction:
    """Fuse one image's branch logits (C,) into the v1 result, applying the decision rule."""
    classes = list(card["classes"])
    names = list(branch_logits)
    logits = [
        torch.as_tensor(np.asarray(branch_logits[n]), dtype=torch.float32)[None] for n in names
    ]
    weights = torch.tensor([fusion_weights[n] for n in names])
    fused = fuse_logits(logits, weights, temperature)[0].tolist()
    branches = {
        n: dict(zip(classes, torch.softmax(lg[0] / temperature, -1).tolist(), strict=True))
        for n, lg in zip(names, logits, strict=True)
    }
    validated = list(card.get("validated_classes", []))
    operating_point = card.get("operating_point")
    decision = decide(fused, validated, fusion_cfg.abstain_threshold, classes, operating_point)
    return Prediction(
        request_id=request_id,
        label=decision.label,
        abstained=decision.abstained,
        abstain_reason=decision.reason,
        probabilities=dict(zip(classes, fused, strict=True)),
        branches=branches,
        fusion_weights=dict(fusion_weights),
        validated_classes=validated,
        decision_threshold=(operating_point or {}).get("threshold"),
        quality=prepared.quality,
        input=prepared.input_info,
        model=model_info(card),
        explanation_url=explanation_url,
    )


class LocalPredictor:
    """Single-process inference with a loaded checkpoint (CLI, notebooks, the naive baseline)."""

    def __init__(self, checkpoint: Checkpoint, fusion_cfg: FusionConfig | None = None) -> None:
        self.checkpoint = checkpoint
        self.cfg = checkpoint.config
        self.fusion_cfg = fusion_cfg or self.cfg.fusion
        self.preprocessor = Preprocessor(self.cfg.preprocess)
        self.model = checkpoint.model.eval()

    @property
    def temperature(self) -> float:
        return self.fusion_cfg.temperature or float(self.model.temperature)

    def prepare(self, data: bytes) -> Prepared:
        return prepare(data, self.cfg, self.preprocessor)

    @torch.inference_mode()
    def predict_prepared(self, prepared: Prepared, request_id: str | None = None) -> Prediction:
        out = self.model(torch.from_numpy(prepared.pixels)[None])
        weights = self.model.fusion_weights.tolist()
        names = list(out.branch_logits)
        return assemble_prediction(
            request_id or uuid.uuid4().hex,
            prepared,
            {n: out.branch_logits[n][0] for n in names},
            dict(zip(names, weights, strict=True)),
            self.temperature,
            self.checkpoint.card,
            self.fusion_cfg,
        )

    def predict(self, data: bytes, request_id: str | None = None) -> tuple[Prediction, Prepared]:
        prepared = self.prepare(data)
        return self.predict_prepared(prepared, request_id), prepared
