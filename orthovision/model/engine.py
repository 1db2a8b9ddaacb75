"""One backbone branch ready to serve: uint8 model inputs -> rows of logits + OOD score.

`OnnxEngine` (the CPU default) runs ONNX Runtime and never imports torch; `TorchEngine`
(model/torch_engine.py) serves GPUs, `cpu_backend: torch`, and any branch whose graph fails
its start-up check against torch's reference outputs (model/onnx_backend.py). Both return
the same rows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from orthovision.config import PreprocessConfig
from orthovision.model.card import verified_tensors
from orthovision.model.onnx_backend import (
    GUARD_MAX_PROB_DIFF,
    GUARD_MAX_PROB_DIFF_INT8,
    OnnxBranch,
    check_against_reference,
    ensure_exported,
    model_input,
)
from orthovision.model.quantize import int8_graph
from orthovision.safety.ood import BranchDetector, load_for_checkpoint

log = logging.getLogger("ray.serve")


def rows(logits: np.ndarray, features: np.ndarray, ood: BranchDetector | None) -> np.ndarray:
    """(N, C + 1): the C logits, then the branch's OOD score (NaN without a detector)."""
    score = ood.score(features) if ood is not None else np.full(len(features), np.nan)
    return np.concatenate([logits, score[:, None]], 1).astype(np.float32)


class OnnxEngine:
    device = "cpu"

    def __init__(
        self, session: OnnxBranch, mean, std, ood: BranchDetector | None, backend: str
    ) -> None:
        self.session, self.mean, self.std, self.ood = session, mean, std, ood
        self.backend = backend

    def __call__(self, batch_uint8: np.ndarray) -> np.ndarray:
        features, logits = self.session(model_input(batch_uint8, self.mean, self.std))
        return rows(logits, features, self.ood)

    @classmethod
    def start(
        cls,
        checkpoint: Path,
        branch: str,
        cpu_backend: str,
        threads: int,
        preprocess: PreprocessConfig,
    ) -> OnnxEngine | None:
        """The engine if its graph passes the start-up check, else None (serve torch).
        A checkpoint that fails its own checks (sha256, preprocessing) raises."""
        norm = [f"norms.{branch}.mean", f"norms.{branch}.std"]
        card, tensors = verified_tensors(checkpoint, norm, expected_preprocess=preprocess)
        mean, std = (tensors[k].tolist() for k in norm)
        sha = card["weights_sha256"]
        graph_kind, tolerance = "onnx", GUARD_MAX_PROB_DIFF
        try:
            graph, reference = ensure_exported(checkpoint, branch, sha, preprocess.image_size)
            if cpu_backend == "onnx-int8":
                int8 = int8_graph(checkpoint, branch, sha)
                if int8 is None:  # none made, or it failed bench/int8.py's validation check
                    log.info("no int8 graph of these weights for %s: serving fp32 ONNX", branch)
                else:
                    graph, graph_kind, tolerance = int8, "onnx-int8", GUARD_MAX_PROB_DIFF_INT8
            session = OnnxBranch(graph, threads)
            # int8 features move the OOD score more than fp32 rounding does: checked offline.
            passed, summary = check_against_reference(
                session, reference, mean, std, tolerance, features=graph_kind == "onnx"
            )
        except Exception as exc:  # an export or runtime fault: torch still serves
            log.warning("ONNX Runtime unavailable for %s (%r): serving torch", branch, exc)
            return None
        if not passed:
            log.warning(
                "ONNX Runtime (%s) disagrees with torch for %s (%s): serving torch",
                graph_kind,
                branch,
                summary,
            )
            return None
        detector = load_for_checkpoint(checkpoint, card, [branch])
        ood = detector.branches[branch] if detector is not None else None
        return cls(session, mean, std, ood, graph_kind)
