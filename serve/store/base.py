"""The result store's contract: `ResultStore` and the types and helpers both backends share.

Records may relate to patients: a store keeps exactly what it is given and never logs or
echoes record contents (nor the store URL, which may carry a password).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "DEFAULT_EXPLANATION_TTL_S",
    "ExplanationImage",
    "ExplanationRecord",
    "ExplanationState",
    "LayerKind",
    "ResultStore",
    "StoreUnavailable",
    "check_ttl",
    "dumps",
]

ExplanationState = Literal["pending", "done", "failed"]
# The separate layers of an overlay (model input, transparent heat map), for a viewer's
# opacity slider; an explanation's images are these and the overlay itself.
LayerKind = Literal["image", "heatmap"]
ExplanationImage = Literal["overlay", "image", "heatmap"]

# Explanations carry PNGs; without a retention bound the store only grows.
DEFAULT_EXPLANATION_TTL_S = 24 * 3600


class StoreUnavailable(Exception):
    """The backing store cannot be reached (or is locked/loading); callers answer 503."""


@dataclass(frozen=True)
class ExplanationRecord:
    id: str
    request_id: str
    state: ExplanationState
    result: dict[str, Any] | None
    error: str | None
    created_at: float
    updated_at: float
    attempts: int


class ResultStore(ABC):
    """Async store shared by all replicas.

    Contract shared by the backends:
    * ``ttl_s`` must be a positive number of seconds or ``None`` (never expires).
    * ``create_explanation`` raises ``ValueError`` if the id already exists (ids are unique).
    * ``complete_explanation`` / ``fail_explanation`` / ``mark_attempt`` raise ``KeyError``
      for an unknown (or expired) id.
    * "done" is terminal for ``fail_explanation``: a late sweeper never overwrites a result.
    * An explanation's images (overlay and layers) live and expire with the explanation.
    * Unreachable backend: ``StoreUnavailable`` (``ping`` returns ``False`` instead).
    """

    async def put_record(self, request_id: str, record: dict, ttl_s: int | None = None) -> None:
        """Store the per-request JSON record (the prediction result)."""
        await self.put_records([(request_id, record)], ttl_s)

    @abstractmethod
    async def put_records(
        self, records: Sequence[tuple[str, dict]], ttl_s: int | None = None
    ) -> None:
        """Store several records in one round trip (one transaction or pipeline)."""

    @abstractmethod
    async def get_record(self, request_id: str) -> dict | None:
        """The record, or ``None`` if unknown or expired."""

    @abstractmethod
    async def create_explanation(self, explanation_id: str, request_id: str) -> None:
        """New explanation in state "pending"."""

    @abstractmethod
    async def complete_explanation(
        self,
        explanation_id: str,
        result: dict,
        overlay_png: bytes,
        layers: Mapping[LayerKind, bytes] | None = None,
    ) -> None:
        """State "done" with its JSON result, overlay PNG and the overlay's layers (PNGs by
        kind), in one atomic step: once "done" reads, every image it serves exists."""

    @abstractmethod
    async def fail_explanation(self, explanation_id: str, reason: str) -> None:
        """State "failed" with a reason (no-op if already "done")."""

    @abstractmethod
    async def get_explanation(self, explanation_id: str) -> ExplanationRecord | None:
        """The explanation, or ``None`` if unknown or expired."""

    @abstractmethod
    async def get_explanation_png(
        self, explanation_id: str, kind: ExplanationImage = "overlay"
    ) -> bytes | None:
        """The overlay PNG (or the layer `kind`) of a "done" explanation, else ``None``."""

    @abstractmethod
    async def mark_attempt(self, explanation_id: str) -> int:
        """Increment attempts (and refresh updated_at); return the new count."""

    @abstractmethod
    async def ping(self) -> bool:
        """True if the backend answers."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


def check_ttl(ttl_s: int | None) -> None:
    """Refuse a TTL that is neither a positive number of seconds nor ``None``."""
    if ttl_s is not None and ttl_s <= 0:
        raise ValueError("ttl_s must be positive or None")


def dumps(obj: dict) -> str:
    """Compact JSON of a stored body."""
    # allow_nan=False: what we store is served back as JSON, and NaN is not JSON.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)
