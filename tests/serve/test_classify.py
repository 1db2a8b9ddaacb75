"""The road of images under replica failures (serve/classify.py), with stand-in handles: every
call ends by its deadline (503 ReplicaUnavailable, its calls cancelled), a batch whose
replica died is retried once, and a second failure reaches the client as what it is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from orthovision.config import ServeConfig
from orthovision.errors import InputError
from serve.classify import Classifier, Deployments, Job, ReplicaUnavailable, replica_failed


class Response:
    """Stands for a DeploymentResponse: awaitable, cancellable."""

    def __init__(self, run) -> None:
        self.task = asyncio.ensure_future(run)
        self.cancelled = False

    def __await__(self):
        return self.task.__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self.task.cancel()


class Handle:
    """Stands for a DeploymentHandle whose calls run `behaviour(attempt, *args)`."""

    def __init__(self, behaviour: Callable) -> None:
        self.behaviour, self.calls = behaviour, []

    def remote(self, *args) -> Response:
        response = Response(self.behaviour(len(self.calls), *args))
        self.calls.append(response)
        return response


async def preprocess(_attempt: int, images: list[bytes], _displays: list[bool]):
    return SimpleNamespace(items=images)  # a PreparedBatch's items: none rejected


async def backbone(_attempt: int, prepared: Response) -> list:
    return [0.0] * len((await prepared).items)


async def fuse(_attempt: int, ids: list[str], prepared: Response, *_logits) -> list:
    # Every outcome an input error: nothing to store, no metrics, the road is what is tested.
    return [InputError(f"answered {i}") for i in ids]


async def never(_attempt: int, *_args) -> list:
    await asyncio.sleep(3600)
    return []


async def dies_once(attempt: int, prepared: Response) -> list:
    if attempt == 0:
        raise ActorDiedError()
    return await backbone(attempt, prepared)


async def always_dies(_attempt: int, _prepared: Response) -> list:
    raise ActorDiedError()


def classifier(second_backbone: Callable, timeout_s: float = 0.5) -> tuple[Classifier, Handle]:
    hurt = Handle(second_backbone)
    deployments = Deployments(
        preprocessor=Handle(preprocess),
        backbones={"a": Handle(backbone), "b": hurt},
        fusion=Handle(fuse),
        explainer=Handle(never),
    )
    cfg = ServeConfig(request_timeout_s=timeout_s)
    return Classifier(deployments, store=None, cfg=cfg, patients=None), hurt


def jobs(n: int) -> list[Job]:
    return [Job(b"x", f"id{i}") for i in range(n)]


def test_a_replica_that_never_answers_gets_a_503_by_the_deadline_and_its_calls_cancelled():
    async def main() -> None:
        road, hurt = classifier(never, timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(ReplicaUnavailable) as raised:
            await road.classify(jobs(3))
        assert time.monotonic() - started < 1.5
        assert raised.value.status == 503 and raised.value.retry_after_s
        assert all(call.cancelled for call in hurt.calls), "a hung call outlived its request"

    asyncio.run(main())


def test_a_batch_whose_replica_died_is_retried_once_and_answered():
    async def main() -> None:
        road, hurt = classifier(dies_once)
        outcomes = await road.classify(jobs(2))
        assert [o.message for o in outcomes] == ["answered id0", "answered id1"]
        assert len(hurt.calls) == 2

    asyncio.run(main())


def test_a_second_failure_reaches_the_caller_after_one_retry():
    async def main() -> None:
        road, hurt = classifier(always_dies)
        with pytest.raises(ActorDiedError):
            await road.classify(jobs(2))
        assert len(hurt.calls) == 2

    asyncio.run(main())


def test_single_requests_share_the_deadline_of_the_request_through_the_item_retries():
    async def main() -> None:
        road, hurt = classifier(never, timeout_s=0.4)
        started = time.monotonic()
        answers = await asyncio.gather(
            *(road.one(b"x", "local", explain=False) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(a, ReplicaUnavailable) for a in answers), answers
        assert time.monotonic() - started < 1.2
        # Every batch slot came back: an idle pipeline sends the next request at once.
        road.deployments.backbones["b"].behaviour = backbone
        assert isinstance(await road.one(b"x", "local", explain=False), InputError)

    asyncio.run(main())


def test_a_full_queue_is_not_a_replica_failure():
    assert replica_failed(ActorDiedError())
    assert not replica_failed(BackPressureError(num_queued_requests=1, max_queued_requests=1))
    assert not replica_failed(ValueError("store down"))
