"""Bulk client: push a folder (or a manifest) of radiographs through the HTTP service.

`orthovision bulk DIR_OR_MANIFEST --url URL --api-key KEY --concurrency N --out results.ndjson`

* One NDJSON line per distinct image content (keyed by sha256): the v1 result, or the
  service's error for an input it refused (a 4xx is final: sending it again cannot help).
* Transient failures (429, 5xx, 408, connection errors, timeouts) are retried with
  exponential backoff and full jitter; a `Retry-After` is honoured as the minimum wait.
* Resumable: items whose content hash is already in the output are skipped, so an
  interrupted run continues where it stopped and never re-sends a finished image. Lines are
  appended and flushed one by one; a line cut short by a crash is ignored on resume.
* Items still failing after the last attempt are not written (a later run retries them)
  and are counted as unfinished in the summary.
"""

from __future__ import annotations

import asyncio
import csv
import email.utils
import hashlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# A folder walk sends every file but sidecar text: the service, not the file name, decides
# what is an image (a GIF in a back-log gets its 415 in the output like any other answer).
SIDECAR_SUFFIXES = {".csv", ".txt", ".json", ".ndjson", ".md", ".yaml", ".yml", ".xml", ".html"}
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}
FATAL_STATUSES = {401, 403}  # a wrong key fails every item alike: stop, do not write them


class BulkAborted(Exception):
    """The service refused the client itself (authentication): nothing more is sent."""


@dataclass
class Summary:
    found: int = 0
    already_done: int = 0
    duplicates: int = 0
    classified: int = 0
    rejected: Counter = field(default_factory=Counter)  # error code -> count
    labels: Counter = field(default_factory=Counter)  # label or "abstained" -> count
    unfinished: list[str] = field(default_factory=list)  # paths, retried in a later run
    unreadable: list[str] = field(default_factory=list)
    retries: int = 0
    elapsed_s: float = 0.0
    aborted: str | None = None

    @property
    def written(self) -> int:
        return self.classified + sum(self.rejected.values())

    def exit_code(self) -> int:
        """0: every item has its line; 2: some inputs were rejected; 1: some not finished."""
        if self.aborted or self.unfinished or self.unreadable:
            return 1
        return 2 if self.rejected else 0

    def lines(self) -> list[str]:
        rate = self.written / self.elapsed_s if self.elapsed_s > 0 else 0.0
        out = [
            f"found {self.found} item(s): {self.already_done} already in the output, "
            f"{self.duplicates} duplicate content(s) skipped",
            f"this run: {self.classified} classified, {sum(self.rejected.values())} rejected, "
            f"{len(self.unfinished)} unfinished, {len(self.unreadable)} unreadable; "
            f"{self.retries} retries; {self.elapsed_s:.1f} s ({rate:.1f} items/s)",
        ]
        if self.labels:
            out.append("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())))
        if self.rejected:
            out.append(
                "rejected: " + ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items()))
            )
        if self.unfinished:
            out.append("unfinished (run again to retry): " + ", ".join(self.unfinished[:5]))
        if self.aborted:
            out.append(f"aborted: {self.aborted}")
        return out


# ---- inputs ------------------------------------------------------------------------------
def discover(source: Path) -> list[Path]:
    """Image files under a folder (recursive, sorted), or the paths a manifest lists: a text
    file with one path per line, or a CSV with a `path` column; relative to the manifest."""
    if source.is_dir():
        return sorted(
            p
            for p in source.rglob("*")
            if p.is_file()
            and not p.name.startswith(".")
            and p.suffix.lower() not in SIDECAR_SUFFIXES
        )
    text = source.read_text()
    lines = text.splitlines()
    if lines and "path" in [c.strip().lower() for c in lines[0].split(",")]:
        reader = csv.DictReader(lines)
        column = next(c for c in reader.fieldnames or [] if c.strip().lower() == "path")
        entries: Iterable[str] = (row[column] for row in reader)
    else:
        entries = (line for line in lines if not line.lstrip().startswith("#"))
    paths = []
    for entry in entries:
        entry = entry.strip()
        if entry:
            path = Path(entry)
            paths.append(path if path.is_absolute() else source.parent / path)
    return paths


def finished_hashes(out: Path) -> set[str]:
    """Content hashes already in the output (lines that do not parse are ignored: the last
    line of a run killed mid-write)."""
    if not out.exists():
        return set()
    done = set()
    with out.open("rb") as f:
        for line in f:
            try:
                sha = json.loads(line).get("sha256")
            except (ValueError, AttributeError):
                continue
            if isinstance(sha, str):
                done.add(sha)
    return done


# ---- retries -----------------------------------------------------------------------------
def retry_after_s(response: httpx.Response) -> float | None:
    """Retry-After as seconds (RFC 9110 10.2.3: delay-seconds or an HTTP date)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_s(attempt: int, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))] (AWS architecture blog,
    "Exponential Backoff And Jitter"): retries of many clients spread out, not in waves."""
    return rng.uniform(0, min(cap_s, base_s * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_s: float = 0.5
    cap_s: float = 30.0
    max_retry_after_s: float = 120.0


# ---- the run -----------------------------------------------------------------------------
class _Writer:
    """Appends one JSON line per finished item; flushes each so a crash loses at most one."""

    def __init__(self, out: Path) -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = out.exists() and out.stat().st_size > 0
        if needs_newline:
            with out.open("rb") as f:
                f.seek(-1, 2)
                needs_newline = f.read(1) != b"\n"
        self._f = out.open("a", encoding="utf-8")
        if needs_newline:  # the previous run died mid-line: start on a fresh one
            self._f.write("\n")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


async def run_bulk(
    paths: list[Path],
    url: str,
    api_key: str | None,
    out: Path,
    *,
    concurrency: int = 8,
    policy: RetryPolicy = RetryPolicy(),
    timeout_s: float = 120.0,
    progress: bool = True,
    explain: bool = False,
    transport: httpx.AsyncBaseTransport | None = None,
    seed: int | None = None,
) -> Summary:
    from tqdm import tqdm

    summary = Summary(found=len(paths))
    done = finished_hashes(out)
    seen: set[str] = set()
    rng = random.Random(seed)
    queue: asyncio.Queue[Path] = asyncio.Queue()
    for path in paths:
        queue.put_nowait(path)
    headers = {"X-API-Key": api_key} if api_key else {}
    writer = _Writer(out)
    bar = tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr)
    abort = asyncio.Event()
    started = time.monotonic()
    endpoint = "/v1/predict?explain=true" if explain else "/v1/predict"

    async def send(client: httpx.AsyncClient, data: bytes) -> httpx.Response | None:
        for attempt in range(1, policy.max_attempts + 1):
            wait = backoff_s(attempt, policy.base_s, policy.cap_s, rng)
            try:
                response = await client.post(
                    endpoint, content=data, headers={"content-type": "application/octet-stream"}
                )
            except httpx.TransportError:  # connection refused/reset, timeouts
                response = None
            if response is not None:
                if response.status_code in FATAL_STATUSES:
                    raise BulkAborted(f"HTTP {response.status_code}: {_error_code(response)}")
                if response.status_code not in RETRY_STATUSES:
                    return response
                hinted = retry_after_s(response)
                if hinted is not None:
                    wait = min(hinted, policy.max_retry_after_s) + rng.uniform(0, policy.base_s)
            if attempt == policy.max_attempts or abort.is_set():
                return None
            summary.retries += 1
            await asyncio.sleep(wait)
        return None

    async def worker(client: httpx.AsyncClient) -> None:
        while not abort.is_set():
            try:
                path = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                await handle(client, path)
            finally:
                bar.update(1)

    async def handle(client: httpx.AsyncClient, path: Path) -> None:
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError:
            summary.unreadable.append(str(path))
            return
        sha = hashlib.sha256(data).hexdigest()
        if sha in seen:  # this run met the same content under another name
            summary.duplicates += 1
            return
        if sha in done:
            summary.already_done += 1
            return
        seen.add(sha)
        try:
            response = await send(client, data)
        except BulkAborted as exc:
            summary.aborted = str(exc)
            summary.unfinished.append(str(path))
            abort.set()
            return
        if response is None:
            summary.unfinished.append(str(path))
            seen.discard(sha)
            return
        record = {"path": str(path), "sha256": sha, "status": response.status_code}
        body = _json(response)
        if response.is_success and isinstance(body, dict) and "probabilities" in body:
            record["result"] = body
            summary.classified += 1
            summary.labels[body.get("label") or "abstained"] += 1
        else:
            error = body.get("error") if isinstance(body, dict) else None
            record["error"] = error or {"code": "http_error", "message": response.reason_phrase}
            summary.rejected[record["error"].get("code", "http_error")] += 1
        writer.write(record)
        done.add(sha)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    try:
        async with httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers=headers,
            timeout=timeout_s,
            limits=limits,
            transport=transport,
        ) as client:
            await asyncio.gather(*(worker(client) for _ in range(max(1, concurrency))))
    finally:
        bar.close()
        writer.close()
        summary.elapsed_s = time.monotonic() - started
    return summary


def _json(response: httpx.Response) -> object:
    try:
        return response.json()
    except ValueError:
        return None


def _error_code(response: httpx.Response) -> str:
    body = _json(response)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("code", "error"))
    return response.reason_phrase
