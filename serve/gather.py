"""Continuous batching for the ingress: requests that wait together travel together.

Why not `@serve.batch`: it forms a batch *before* waiting for a free concurrency slot
(`max_concurrent_batches`), so under a steady closed loop every request leaves alone and
waits for its slot with a batch of one. Here a batch is formed when a slot frees: an idle
service sends a request at once (no timer, no added latency), a busy one sends everything
that queued meanwhile, up to `max_size`. A *full* batch never waits for a slot: it cannot
grow, and holding it back would hide the load from the deployments behind (their
autoscaling sees only the work that reaches them). A batch that fails with an error
`isolate` accepts (a replica crashed on some item) is retried item by item, all at once, so
one poison input fails alone and the others do not wait behind it. A request whose caller
went away leaves the queue: no batch slot is spent on an answer nobody reads. A slot comes
back when its batch ends, so `run` must end (serve/classify.py bounds every call by a
deadline).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Gatherer(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        max_size: int,
        slots: int,
        isolate: Callable[[Exception], bool] = lambda _exc: False,
    ) -> None:
        self._run, self.max_size, self._free, self._isolate = run, max_size, slots, isolate
        self._queue: list[tuple[T, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()

    async def submit(self, item: T) -> R:
        """The result for `item`, computed in a batch with whatever queued beside it."""
        future = asyncio.get_running_loop().create_future()
        entry = (item, future)
        self._queue.append(entry)
        self._dispatch()
        try:
            return await future
        except asyncio.CancelledError:
            # Not sent yet: nobody will read its answer. (By identity: items may compare equal.)
            self._queue = [queued for queued in self._queue if queued is not entry]
            raise

    def _dispatch(self) -> None:
        while self._queue and (self._free > 0 or len(self._queue) >= self.max_size):
            batch = self._queue[: self.max_size]
            del self._queue[: self.max_size]
            self._free -= 1  # below zero while full batches run beyond the slots
            task = asyncio.create_task(self._complete(batch))
            self._tasks.add(task)  # keep a reference until it is done
            task.add_done_callback(self._tasks.discard)

    async def _complete(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        try:
            await self._settle(batch)
        finally:
            self._free += 1
            self._dispatch()

    async def _settle(self, batch: list[tuple[T, asyncio.Future]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except Exception as exc:  # every caller of the batch gets the error...
            if len(batch) > 1 and self._isolate(exc):
                # ...unless a replica died on some item: find which
                await asyncio.gather(*(self._settle([one]) for one in batch))
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():  # its client may have gone away
                future.set_result(result)
