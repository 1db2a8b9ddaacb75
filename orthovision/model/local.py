"""Single-process inference with a loaded checkpoint: the CLI, notebooks and the naive
benchmark baseline (Serve runs the same stages as deployments).
"""

from __future__ import annotations

import uuid

import torch

from orthovision.config import FusionConfig
from orthovision.imaging.preprocess import Preprocessor
from orthovision.model.backbones import branch_features
from orthovision.model.checkpoint import Checkpoint
from orthovision.model.pipeline import Prepared, assemble_prediction, prepare
from orthovision.safety.ood import load_for_checkpoint
from orthovision.schema import Prediction


class LocalPredictor:
    """Single-process inference with a loaded checkpoint (CLI, notebooks, the naive baseline)."""

    def __init__(self, checkpoint: Checkpoint, fusion_cfg: FusionConfig | None = None) -> None:
        self.checkpoint = checkpoint
        self.cfg = checkpoint.config
        self.fusion_cfg = fusion_cfg or self.cfg.fusion
        self.preprocessor = Preprocessor(self.cfg.preprocess)
        self.model = checkpoint.model.eval()
        self.ood = load_for_checkpoint(checkpoint.path, checkpoint.card)

    @property
    def temperature(self) -> float:
        return self.fusion_cfg.temperature or float(self.model.temperature)

    def prepare(self, data: bytes) -> Prepared:
        return prepare(data, self.cfg, self.preprocessor)

    @torch.inference_mode()
    def predict_prepared(self, prepared: Prepared, request_id: str | None = None) -> Prediction:
        x = torch.from_numpy(prepared.pixels)[None]
        names = list(self.model.branch_names)
        features, logits = {}, {}
        for n in names:
            feats, lg = branch_features(self.model.branches[n], self.model.branch_input(n, x))
            features[n], logits[n] = feats.float().numpy(), lg[0].float().numpy()
        ood_score = float(self.ood.score(features)[0]) if self.ood is not None else None
        weights = self.model.fusion_weights.tolist()
        return assemble_prediction(
            request_id or uuid.uuid4().hex,
            prepared,
            logits,
            dict(zip(names, weights, strict=True)),
            self.temperature,
            self.checkpoint.card,
            self.fusion_cfg,
            ood_score=ood_score,
        )

    def predict(self, data: bytes, request_id: str | None = None) -> tuple[Prediction, Prepared]:
        prepared = self.prepare(data)
        return self.predict_prepared(prepared, request_id), prepared
