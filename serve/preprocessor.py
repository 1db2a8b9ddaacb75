"""Preprocessor deployment: the CPU pool that turns bytes into the uint8 model input."""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from orthovision.errors import InputError, UndecodableImage
from orthovision.imaging.preprocess import Preprocessor as PixelPreprocessor
from orthovision.model.pipeline import Prepared, PreparedBatch, prepare
from serve.metrics import metrics
from serve.runtime import config_from, limit_cpu_threads

log = logging.getLogger("ray.serve")


class Preprocessor:
    def __init__(self, config: dict) -> None:
        self.cfg = config_from(config)
        limit_cpu_threads(self.cfg.serve.preprocessor.num_cpus)
        self.preprocessor = PixelPreprocessor(self.cfg.preprocess)

    async def __call__(self, images: list[bytes]) -> PreparedBatch:
        """Every image of one call, in order. A bad input becomes its item's InputError, not
        an exception: it flows through the backbones untouched, never fails the batch it
        shares, and the ingress maps it to a 4xx."""
        started = time.perf_counter()
        batch = await asyncio.to_thread(self._prepare_all, images)
        metrics().stage_latency.observe(time.perf_counter() - started, tags={"stage": "preprocess"})
        return batch

    def _prepare_all(self, images: list[bytes]) -> PreparedBatch:
        items = [self._prepare_one(data) for data in images]
        return PreparedBatch.of(items, self.cfg.preprocess.image_size)

    def _prepare_one(self, data: bytes) -> Prepared | InputError:
        try:
            return prepare(data, self.cfg, self.preprocessor)
        except InputError as exc:
            error = exc
        except Exception as exc:  # a decoder fault on one file must not fail its neighbours
            # The exception's text may quote file content: log its type only.
            log.error("preprocessing failed unexpectedly: %s", type(exc).__name__)
            error = UndecodableImage("the image could not be decoded")
        metrics().rejected.inc(tags={"reason": error.code})
        return error


# Bound outside the class body so Ray pickles the class by reference (importable),
# not by value: torch objects in a by-value closure are not picklable.
PreprocessorDeployment = serve.deployment(Preprocessor)
