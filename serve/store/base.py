"""The result store's contract: `ResultStore` and the types and helpers both backends share.

Records may relate to patients: a store keeps exactly what it is given and never logs or
echoes record contents (nor the store URL, which may carry a password). Study entries hold
a patient's pseudonymous reference, never an identifier (serve/patients.py).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

__all__ = [
    "DEFAULT_EXPLANATION_TTL_S",
    "Erased",
    "ExplanationImage",
    "ExplanationRecord",
    "ExplanationState",
    "InstanceState",
    "LayerKind",
    "ResultStore",
    "StoreUnavailable",
    "StudyEntry",
    "check_ttl",
    "dumps",
]

ExplanationState = Literal["pending", "done", "failed"]
# The separate layers of an overlay (model input, transparent heat map), for a viewer's
# opacity slider; an explanation's images are these and the overlay itself.
LayerKind = Literal["image", "heatmap"]
ExplanationImage = Literal["overlay", "image", "heatmap"]
# An instance of a study: registered on arrival (STOW-RS), then answered or refused.
InstanceState = Literal["pending", "done", "failed"]

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


@dataclass(frozen=True)
class StudyEntry:
    """One instance of a study as the store keeps it, per tenant: ids, dates, anatomy and
    the prediction's summary. `patient_ref` is a pseudonym; no patient identifier here."""

    tenant: str
    study_uid: str
    request_id: str
    created_at: float
    state: InstanceState = "done"
    patient_ref: str | None = None
    study_date: str | None = None  # DICOM DA: YYYYMMDD
    body_part: str | None = None
    view: str | None = None  # DICOM ViewPosition (AP, PA, LAT, ...)
    label: str | None = None
    fracture_probability: float | None = None
    abstained: bool = False
    abstain_reason: str | None = None
    error: str | None = None  # the input error's code of a refused instance

    def to_json(self) -> str:
        return dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str | bytes) -> StudyEntry:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(text).items() if k in known})


@dataclass(frozen=True)
class Erased:
    """What an erasure removed."""

    records: int = 0
    explanations: int = 0
    study_entries: int = 0


class ResultStore(ABC):
    """Async store shared by all replicas.

    Contract shared by the backends:
    * ``ttl_s`` must be a positive number of seconds or ``None`` (never expires).
    * ``create_explanation`` raises ``ValueError`` if the id already exists (ids are unique).
    * ``complete_explanation`` / ``fail_explanation`` / ``mark_attempt`` raise ``KeyError``
      for an unknown (or expired) id.
    * "done" is terminal for ``fail_explanation``: a late sweeper never overwrites a result.
    * An explanation's images (overlay and layers) live and expire with the explanation.
    * Study entries are per tenant: a tenant never reads or erases another's.
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
    async def put_study_entries(
        self, entries: Sequence[StudyEntry], ttl_s: int | None = None
    ) -> None:
        """Insert or replace entries (key: tenant, study, request id) in one round trip;
        each study's (and its patient's) retention restarts at this write."""

    @abstractmethod
    async def get_study(self, tenant: str, study_uid: str) -> list[StudyEntry]:
        """The tenant's entries of one study, oldest first ([] if unknown or expired)."""

    @abstractmethod
    async def get_patient_entries(self, tenant: str, patient_ref: str) -> list[StudyEntry]:
        """The tenant's entries with this patient reference, oldest first."""

    @abstractmethod
    async def erase_patient(self, tenant: str, patient_ref: str) -> Erased:
        """Remove every study entry of the patient and the records and explanations of
        their request ids, at once; how many of each were removed."""

    async def sweep(self) -> int:
        """Delete what outlived its retention now; how many rows went. Backends with native
        expiry (Redis TTLs) have nothing to sweep."""
        return 0

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
