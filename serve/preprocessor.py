"""Preprocessor deployment: the CPU pool that turns bytes into the uint8 model input."""

from __future__ import annotations

import asyncio
import time

from ray import serve

from orthovision.errors import InputError
from orthovision.pipeline import Prepared, prepare
from orthovision.preprocess import Preprocessor as PixelPreprocessor
from serve.metrics import metrics
from serve.runtime import config_from, limit_cpu_threads


class Preprocessor:
    def __init__(self, config: dict) -> None:
        self.cfg = config_from(config)
        limit_cpu_threads(self.cfg.serve.preprocessor.num_cpus)
        self.preprocessor = PixelPreprocessor(self.cfg.preprocess)

    async def __call__(self, data: bytes) -> Prepared | InputError:
        """A bad input is returned, not raised: it flows through the backbones untouched so it
        never fails the batch it shares, and the ingress maps it to a 4xx."""
        started = time.perf_counter()
        try:
            return await asyncio.to_thread(prepare, data, self.cfg, self.preprocessor)
        except InputError as exc:
            metrics().rejected.inc(tags={"reason": exc.code})
            return exc
        finally:
            metrics().stage_latency.observe(
                time.perf_counter() - started, tags={"stage": "preprocess"}
            )


# Bound outside the class body so Ray pickles the class by reference (importable),
# not by value: torch objects in a by-value closure are not picklable.
PreprocessorDeployment = serve.deployment(Preprocessor)
