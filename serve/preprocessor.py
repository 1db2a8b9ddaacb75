"""Preprocessor deployment: the CPU pool that turns bytes into the uint8 model input."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from ray import serve

from orthovision.errors import InputError, UndecodableImage
from orthovision.imaging.display import display_png
from orthovision.imaging.preprocess import Preprocessor as PixelPreprocessor
from orthovision.model.pipeline import Prepared, PreparedBatch, prepare
from serve.busy import BusyMeter
from serve.metrics import metrics
from serve.runtime import config_from, limit_cpu_threads, replica_setup

log = logging.getLogger("ray.serve")


class Preprocessor:
    def __init__(self, config: dict) -> None:
        replica_setup()
        self.cfg = config_from(config)
        limit_cpu_threads(self.cfg.serve.preprocessor.num_cpus)
        self.preprocessor = PixelPreprocessor(self.cfg.preprocess)
        self.busy = BusyMeter()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's custom autoscaling stat: how busy this replica was (serve/busy.py)."""
        return self.busy.stats()

    async def __call__(
        self, images: list[bytes], displays: list[bool] | None = None
    ) -> PreparedBatch:
        """Every image of one call, in order. A bad input becomes its item's InputError, not
        an exception: it flows through the backbones untouched, never fails the batch it
        shares, and the ingress maps it to a 4xx. `displays[i]`: keep a display rendering
        of image i if it is DICOM (asked for by the viewer only, see `_with_display`)."""
        started = time.perf_counter()
        wanted = displays or [False] * len(images)
        batch = await asyncio.to_thread(self._prepare_all, images, wanted)
        metrics().stage_latency.observe(time.perf_counter() - started, tags={"stage": "preprocess"})
        return batch

    def _prepare_all(self, images: list[bytes], displays: list[bool]) -> PreparedBatch:
        with self.busy.working():
            return self._prepare_each(images, displays)

    def _prepare_each(self, images: list[bytes], displays: list[bool]) -> PreparedBatch:
        items = []
        for data, display in zip(images, displays, strict=True):
            item = self._prepare_one(data)
            items.append(self._with_display(item, data) if display else item)
        return PreparedBatch.of(items, self.cfg.preprocess.image_size)

    def _with_display(self, item: Prepared | InputError, data: bytes) -> Prepared | InputError:
        """A DICOM item with its display rendering. On request only: a second decode, at
        display size, costs 0.2-0.9 s of CPU on ../shared/data/dicom (1.3-15x the model's
        reduced decode) and its PNG 0.6-1.3 MB in the record for the record's retention,
        which bulk PACS traffic would pay and never look at; PNG and JPEG inputs need none
        (the browser shows the upload itself). Without it the prediction still stands: a
        failure is logged and the viewer says there is no full image."""
        if not isinstance(item, Prepared) or item.input_info.get("format") != "dicom":
            return item
        try:
            return replace(item, display_png=display_png(data, self.cfg.decode))
        except Exception as exc:  # the model's decode of the same bytes succeeded
            log.warning("display rendering failed: %s", type(exc).__name__)
            return item

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
