"""The v1 prediction result (docs/DESIGN.md: HTTP contract).

The CLI prints it; the HTTP API returns it.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from orthovision.imaging.pixels import InputInfo

# Key of the part of a stored per-request record that is never returned by the API (the DICOM
# source's UIDs and patient/study attributes, the creation time): DICOM outputs read it.
PRIVATE_KEY = "_private"


class ModelInfo(BaseModel):
    name: str
    version: str
    sha256: str
    trained: bool


class QualityFindingOut(BaseModel):
    check: str
    severity: str
    message: str
    value: float


class QualityOut(BaseModel):
    passed: bool
    findings: list[QualityFindingOut]


class Prediction(BaseModel):
    request_id: str
    label: str | None = Field(description="predicted class; null when the model abstains")
    abstained: bool
    abstain_reason: str | None = None
    abstain_code: str | None = Field(
        None,
        description="out_of_scope | out_of_distribution | unvalidated_class | low_confidence",
    )
    ood_score: float | None = Field(
        None,
        description="feature-space distance from the training data; above the card's "
        "ood.threshold the model abstains (out_of_distribution)",
    )
    probabilities: dict[str, float] = Field(description="calibrated fused probabilities")
    branches: dict[str, dict[str, float]] = Field(description="per-backbone probabilities")
    fusion_weights: dict[str, float]
    validated_classes: list[str]
    decision_threshold: float | None = Field(
        None,
        description="fracture is the label when its probability reaches this (the card's "
        "operating point, chosen on validation for sensitivity >= 0.90); null: top class",
    )
    quality: QualityOut
    input: InputInfo
    model: ModelInfo
    explanation_url: str | None = None
    study_instance_uid: str | None = Field(
        None,
        description="a DICOM input's StudyInstanceUID, for GET /v1/studies/{uid} and the "
        "patient's timeline; null for PNG/JPEG",
    )


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody
