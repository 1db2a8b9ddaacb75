"""Reading a Prometheus text page (a Ray node's metrics export port, the service's /metrics)."""

from __future__ import annotations

import httpx


def scrape(url: str) -> str:
    return httpx.get(url, timeout=10).text


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every series of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
