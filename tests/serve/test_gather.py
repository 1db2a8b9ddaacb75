"""Continuous batching in the ingress (serve/gather.py): no timer, batches form while busy."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from serve.gather import Gatherer


class Crash(Exception):
    """Stands for a replica that died on one item (RayError in the ingress)."""


class Pipeline:
    """Doubles numbers; records every batch; a release event holds a batch in flight."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        await self.release.wait()
        if -1 in items:
            raise Crash("poison")
        if -2 in items:
            raise ValueError("store down")
        return [2 * i for i in items]


def test_idle_request_leaves_alone_and_at_once() -> None:
    async def main() -> None:
        pipe = Pipeline()
        gatherer = Gatherer(pipe, max_size=8, slots=2)
        assert await asyncio.wait_for(gatherer.submit(21), 1) == 42
        assert pipe.batches == [[21]]

    asyncio.run(main())


def test_requests_queued_while_busy_leave_together_within_max_size() -> None:
    async def main() -> None:
        pipe = Pipeline()
        pipe.release.clear()
        gatherer = Gatherer(pipe, max_size=4, slots=1)
        first = asyncio.create_task(gatherer.submit(0))
        await asyncio.sleep(0)
        rest = [asyncio.create_task(gatherer.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0.01)
        # The only slot is busy: a full batch leaves anyway (it cannot grow, and the load
        # must reach the deployments behind), the partial one waits for the slot.
        assert pipe.batches == [[0], [1, 2, 3, 4]]
        pipe.release.set()
        assert await asyncio.gather(first, *rest) == [2 * i for i in range(7)]
        assert pipe.batches == [[0], [1, 2, 3, 4], [5, 6]]
        assert await asyncio.wait_for(gatherer.submit(7), 1) == 14  # slots all came back
        assert pipe.batches[-1] == [7]

    asyncio.run(main())


def test_crashed_batch_is_retried_item_by_item() -> None:
    async def main() -> None:
        pipe = Pipeline()
        pipe.release.clear()
        gatherer = Gatherer(pipe, max_size=8, slots=1, isolate=lambda e: isinstance(e, Crash))
        busy = asyncio.create_task(gatherer.submit(100))
        await asyncio.sleep(0)
        queued = [asyncio.create_task(gatherer.submit(i)) for i in (1, -1, 3)]
        await asyncio.sleep(0.01)
        pipe.release.set()
        assert await busy == 200
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert results[0] == 2 and results[2] == 6
        assert isinstance(results[1], Crash)
        assert pipe.batches[1:] == [[1, -1, 3], [1], [-1], [3]]

    asyncio.run(main())


def test_other_errors_fail_the_whole_batch_once() -> None:
    async def main() -> None:
        pipe = Pipeline()
        pipe.release.clear()
        gatherer = Gatherer(pipe, max_size=8, slots=1, isolate=lambda e: isinstance(e, Crash))
        busy = asyncio.create_task(gatherer.submit(5))
        await asyncio.sleep(0)
        queued = [asyncio.create_task(gatherer.submit(i)) for i in (1, -2)]
        await asyncio.sleep(0.01)
        pipe.release.set()
        await busy
        for task in queued:
            with pytest.raises(ValueError):
                await task
        assert pipe.batches[1:] == [[1, -2]]  # not retried: splitting would not help

    asyncio.run(main())


def test_a_departed_caller_does_not_break_its_batch() -> None:
    async def main() -> None:
        pipe = Pipeline()
        pipe.release.clear()
        gatherer = Gatherer(pipe, max_size=8, slots=1)
        busy = asyncio.create_task(gatherer.submit(0))
        await asyncio.sleep(0)
        gone = asyncio.create_task(gatherer.submit(1))
        stays = asyncio.create_task(gatherer.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()
        pipe.release.set()
        assert await busy == 0 and await stays == 4
        assert gone.cancelled()
        assert await asyncio.wait_for(gatherer.submit(3), 1) == 6  # the slot came back

    asyncio.run(main())


def test_a_request_whose_caller_left_never_travels() -> None:
    async def main() -> None:
        pipe = Pipeline()
        pipe.release.clear()
        gatherer = Gatherer(pipe, max_size=8, slots=1)
        busy = asyncio.create_task(gatherer.submit(1))
        await asyncio.sleep(0)
        gone, stays = (asyncio.create_task(gatherer.submit(i)) for i in (2, 3))
        await asyncio.sleep(0.01)
        gone.cancel()  # its client disconnected while it queued
        await asyncio.sleep(0.01)
        pipe.release.set()
        assert await busy == 2 and await stays == 6
        assert pipe.batches == [[1], [3]]

    asyncio.run(main())
