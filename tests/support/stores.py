"""Result stores for tests: a throw-away redis-server, and running a scenario against a
store made inside the scenario's event loop (redis.asyncio binds to its loop)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from serve.store import ResultStore
from support.liveapp import free_port

REDIS_BIN = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_BIN is None, reason="redis-server not installed (.ci/run installs it)"
)

Factory = Callable[..., ResultStore]


class RedisServer:
    """A throw-away redis-server process in its own directory."""

    def __init__(
        self, workdir: Path, *, persistent: bool = False, password: str | None = None
    ) -> None:
        self.dir = workdir
        self.port = free_port()
        self.persistent = persistent
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_BIN is not None
        args = [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += ["--save", ""]
        args += ["--appendonly", "yes" if self.persistent else "no"]
        if self.password:
            args += ["--requirepass", self.password, "--protected-mode", "yes"]
        self.proc = subprocess.Popen(
            args, cwd=self.dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        client = redis.Redis(
            port=self.port, password=self.password, socket_connect_timeout=0.2, socket_timeout=0.5
        )
        deadline = time.monotonic() + 10
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer PING")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()  # SIGTERM: redis flushes the AOF before exiting
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password)

    def flush(self) -> None:
        with self.client() as client:
            client.flushdb()


def run(factory: Factory, scenario: Callable[[ResultStore], Awaitable[Any]], **kw: Any) -> Any:
    async def main() -> Any:
        store = factory(**kw)
        try:
            return await scenario(store)
        finally:
            await store.close()

    return asyncio.run(main())
