"""The four OrthoVision classes and the label maps of the datasets we read."""

from __future__ import annotations

CLASSES: tuple[str, ...] = ("fracture", "non-affected", "tumor-benign", "tumor-malignant")
NUM_CLASSES = len(CLASSES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASSES)}

# Kaggle "Bone Fracture Binary Classification" (the shared fracture-xray set).
FRACTURE_XRAY_LABELS: dict[str, str] = {
    "fractured": "fracture",
    "not fractured": "non-affected",
    "not_fractured": "non-affected",
}


def class_index(label: str) -> int:
    """Index of a project label; raises KeyError with the known labels on a typo."""
    try:
        return CLASS_INDEX[label]
    except KeyError:
        raise KeyError(f"unknown label {label!r}; expected one of {CLASSES}") from None
