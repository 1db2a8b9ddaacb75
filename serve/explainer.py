"""Explainer deployment: GradCAM++ off the request path, one explanation at a time per replica.

pytorch-grad-cam hooks the shared model, so max_ongoing_requests is 1 (one explanation at a time).
"""

from __future__ import annotations

import asyncio
import time

from ray import serve

from orthovision.model.pipeline import Prepared, PreparedBatch
from serve.metrics import metrics
from serve.runtime import (
    checkpoint_path,
    config_from,
    forward_thread,
    limit_cpu_threads,
    may_use_cuda,
    replica_setup,
)
from serve.store import LayerKind, open_store


class Explainer:
    def __init__(self, config: dict) -> None:
        replica_setup()
        self.cfg = config_from(config)
        threads, niceness = 1, 0
        if not may_use_cuda(self.cfg.serve.device):
            threads = limit_cpu_threads(self.cfg.serve.explainer.num_cpus)
            # Explanations are background work: below the backbones as well.
            niceness = 2 * self.cfg.serve.cpu_model_niceness
        self.work = forward_thread(niceness, "explain")
        # The model loads on that low-priority thread: the replica is up at once, the
        # classifying replicas start without competing with a torch import, and an
        # explanation asked for meanwhile queues behind the load on the same thread.
        self.loading = self.work.submit(self._load, threads)
        self.store = open_store(self.cfg.serve.store_url)

    def _load(self, threads: int) -> None:
        # Imported here, not at the top: the driver that builds the application imports
        # this module, and only model replicas should load torch.
        import torch

        from orthovision.model.checkpoint import load_checkpoint
        from orthovision.model.device import resolve_device

        self.device = resolve_device(self.cfg.serve.device)
        if self.device.type == "cpu":
            torch.set_num_threads(threads)
        ckpt = load_checkpoint(checkpoint_path(self.cfg), expected_preprocess=self.cfg.preprocess)
        # float32 even on CUDA: gradients of half-precision CAMs are too coarse.
        self.model = ckpt.model.to(self.device).eval()
        self.classes = list(ckpt.card["classes"])

    def _explain(
        self, prepared: Prepared, target_class: int | None
    ) -> tuple[dict, bytes, dict[LayerKind, bytes]]:
        import torch

        from orthovision.model.explain import explain, grey_png, heatmap_rgba_png, overlay_png

        self.loading.result()  # done (same thread); re-raises a failed load
        with torch.enable_grad():
            result = explain(
                self.model, prepared.pixels, target_class, content_box=prepared.content_box
            )
        png = overlay_png(prepared.pixels[0], result.heatmap, self.cfg.explain.overlay_alpha)
        grey = prepared.pixels[0]
        # The two layers of the overlay, for a viewer's opacity slider.
        layers: dict[LayerKind, bytes] = {
            "image": grey_png(grey),
            "heatmap": heatmap_rgba_png(result.heatmap, (grey.shape[1], grey.shape[0])),
        }
        summary = {
            "method": self.cfg.explain.method,
            "target_class": self.classes[result.target_class],
            "fusion_weights": result.fusion_weights,
            "heatmap_size": list(result.heatmap.shape),
        }
        if prepared.content_box is not None:
            # Where the source lies in the heat map (left, top, width, height): a viewer
            # crops this box and scales it onto the full image (the letterbox undone).
            summary["input_box"] = list(prepared.content_box)
        return summary, png, layers

    async def __call__(
        self,
        explanation_id: str,
        batch: PreparedBatch,
        index: int,
        target_class: int | None = None,
    ) -> str:
        """Explain item `index` of a preprocessed batch (the one its prediction came from)."""
        started = time.perf_counter()
        prepared = batch.items[index]
        await self.store.mark_attempt(explanation_id)
        loop = asyncio.get_running_loop()
        summary, png, layers = await loop.run_in_executor(
            self.work, self._explain, prepared, target_class
        )
        # Overlay and layers with the "done" state, in one step: they expire together.
        await self.store.complete_explanation(explanation_id, summary, png, layers)
        metrics().explanation_latency.observe(time.perf_counter() - started)
        metrics().explanations.inc(tags={"outcome": "done"})
        return "done"


# Bound outside the class body so Ray pickles the class by reference (importable), not by
# value.
ExplainerDeployment = serve.deployment(Explainer)
