"""Fusion deployment: learned weights, calibrated probabilities, the abstain rule."""

from __future__ import annotations

import time

import numpy as np
from ray import serve

from orthovision.config import FusionConfig
from orthovision.model.card import load_fusion_head
from orthovision.model.pipeline import (
    Classified,
    ItemOutcome,
    Prepared,
    PreparedBatch,
    assemble_prediction,
)
from serve.clinical import encode_display, encode_model_input
from serve.metrics import metrics
from serve.runtime import checkpoint_path, config_from, replica_setup


class Fusion:
    def __init__(self, config: dict) -> None:
        replica_setup()
        cfg = config_from(config)
        head = load_fusion_head(checkpoint_path(cfg), expected_preprocess=cfg.preprocess)
        self.card = head.card
        self.fusion_weights = head.fusion_weights
        self.branches = list(head.fusion_weights)
        self.calibrated_temperature = head.temperature
        self.reconfigure(cfg.fusion.model_dump())

    def reconfigure(self, user_config: dict) -> None:
        """Temperature and abstain threshold from user_config, applied without a restart."""
        self.fusion_cfg = FusionConfig.model_validate(user_config)
        self.temperature = self.fusion_cfg.temperature or self.calibrated_temperature

    async def __call__(
        self, request_ids: list[str], prepared: PreparedBatch, *branch_logits: np.ndarray
    ) -> list[ItemOutcome]:
        """One outcome per item, in order: its Classified answer, or its input error."""
        results: list[ItemOutcome] = []
        row = 0
        for rid, item in zip(request_ids, prepared.items, strict=True):
            if isinstance(item, Prepared):
                results.append(self._classified(rid, item, [lg[row] for lg in branch_logits]))
                row += 1
            else:
                results.append(item)
        return results

    def _classified(
        self, request_id: str, prepared: Prepared, rows: list[np.ndarray]
    ) -> Classified:
        # Each backbone row: C logits, then its branch's OOD score (NaN: none).
        logits = [row[:-1] for row in rows]
        ood = float(sum(row[-1] for row in rows))
        prediction = assemble_prediction(
            request_id,
            prepared,
            dict(zip(self.branches, logits, strict=True)),
            self.fusion_weights,
            self.temperature,
            self.card,
            self.fusion_cfg,
            ood_score=ood if np.isfinite(ood) else None,
        )
        metrics().predictions.inc(tags={"label": prediction.label or "abstained"})
        return Classified(
            prediction.model_dump(mode="json"),
            created_at=time.time(),
            dicom_source=prepared.dicom_source,
            model_input_png=(
                encode_model_input(prepared.pixels) if prepared.dicom_source else None
            ),
            display_png=encode_display(prepared.display_png) if prepared.display_png else None,
        )

    async def model_card(self) -> dict:
        return self.card


# Bound outside the class body so Ray pickles the class by reference (importable),
# not by value: torch objects in a by-value closure are not picklable.
FusionDeployment = serve.deployment(Fusion)
