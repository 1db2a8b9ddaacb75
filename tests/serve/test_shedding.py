"""Load shedding in the proxy (serve/shedding.py): refusals before the body is read, fair
between API keys, JSON 503 + Retry-After; and Serve's proxy really loads it."""

from __future__ import annotations

import asyncio
import json

import pytest

from serve.shedding import ShedAtProxy, middlewares, proxy_environment


class HeldApp:
    """Downstream stand-in: each request holds its slot until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self, scope, receive, send) -> None:
        self.calls += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def scope(path="/v1/predict", method="POST", key=b"key-a"):
    return {"type": "http", "method": method, "path": path, "headers": [(b"x-api-key", key)]}


async def call(app, scope_):
    sent = []
    read = False

    async def receive():
        nonlocal read
        read = True
        return {"type": "http.request", "body": b"img", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope_, receive, send)
    return sent, read


def test_sheds_beyond_the_bound_without_reading_the_body():
    async def run():
        downstream = HeldApp()
        proxy = ShedAtProxy(downstream, max_inflight=3)
        held = [asyncio.create_task(call(proxy, scope())) for _ in range(2)]
        await asyncio.sleep(0)
        # A lone key keeps one slot free for a newcomer: its third request is refused.
        sent, read = await call(proxy, scope())
        start, body = sent
        assert start["status"] == 503 and not read
        assert dict(start["headers"])[b"retry-after"] == b"1"
        assert json.loads(body["body"])["error"]["code"] == "overloaded"
        # Another key gets the slot kept for it; reads and other routes are never shed.
        other = asyncio.create_task(call(proxy, scope(key=b"key-b")))
        health = asyncio.create_task(call(proxy, scope("/readyz", "GET")))
        await asyncio.sleep(0)
        assert downstream.calls == 4 and proxy.shed == 1
        downstream.release.set()
        for task in [*held, other, health]:
            sent, _ = await task
            assert sent[0]["status"] == 200
        assert proxy.admission.total == 0

    asyncio.run(run())


def test_the_callback_follows_the_environment(monkeypatch):
    for key, value in proxy_environment(5, "X-API-Key").items():
        monkeypatch.setenv(key, value)
    (only,) = middlewares()
    assert only.cls is ShedAtProxy and only.kwargs["max_inflight"] == 5
    monkeypatch.setenv("ORTHOVISION_PROXY_MAX_INFLIGHT", "0")
    assert middlewares() == []


@pytest.mark.serve
def test_serves_proxy_runs_the_shedding_middleware(live_app):
    """Saturate the live proxy with more concurrent uploads than its bound, under one key:
    some are refused by the proxy itself, told apart by the missing x-request-id header
    (Serve's request-id middleware sits inside ours, so only answers that went through
    Serve carry one)."""
    import httpx
    from support.images import make_png
    from support.liveapp import KEY, radiograph

    bound = live_app.cfg.serve.proxy_max_inflight
    body = make_png(radiograph(3))

    async def burst():
        async with httpx.AsyncClient(base_url=live_app.url, timeout=120) as client:
            requests = [
                client.post("/v1/predict", content=body, headers={"X-API-Key": KEY})
                for _ in range(3 * bound)
            ]
            return await asyncio.gather(*requests)

    answers = asyncio.run(burst())
    refused = [r for r in answers if r.status_code == 503]
    assert refused and all(r.headers["Retry-After"] for r in refused)
    assert all(r.json()["error"]["code"] == "overloaded" for r in refused)
    assert any("x-request-id" not in r.headers for r in refused)
    assert all("x-request-id" in r.headers for r in answers if r.status_code == 200)
