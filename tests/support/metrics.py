"""Reading the live app's Prometheus metrics."""

from __future__ import annotations

from bench.prometheus import metric_sum
from bench.prometheus import scrape as scrape_url

__all__ = ["metric_sum", "scrape"]


def scrape(port: int) -> str:
    return scrape_url(f"http://127.0.0.1:{port}/metrics")
