"""Scope from the DICOM header: anatomy the checkpoint was never trained on.

The card's `scope` section (written at training time from the data's own documentation)
names the anatomy the training data covers and the body parts that are clearly outside it.
A DICOM whose BodyPartExamined is one of those gets an abstention (`out_of_scope`), never a
finding; an unknown or missing body part falls through to the pixel-based OOD score
(orthovision/safety/ood.py).
"""

from __future__ import annotations

from collections.abc import Mapping

# DICOM PS3.16 CID 4031 defined terms (and common vendor spellings) of anatomy that is not
# an extremity bone radiograph: chest and abdominal films, head, breast, soft tissue.
NOT_EXTREMITY_BODY_PARTS: tuple[str, ...] = (
    "CHEST",
    "THORAX",
    "LUNG",
    "HEART",
    "BREAST",
    "ABDOMEN",
    "ABDOMENPELVIS",
    "KIDNEY",
    "BLADDER",
    "COLON",
    "STOMACH",
    "ESOPHAGUS",
    "SKULL",
    "HEAD",
    "BRAIN",
    "FACE",
    "SINUS",
    "NECK",
    "JAW",
    "TMJ",
    "MANDIBLE",
    "TEETH",
)

# What the shared fracture set documents (shared/data/README.md): upper-extremity
# radiographs, mostly wrist, hand and forearm.
FRACTURE_XRAY_SCOPE = {
    "anatomy": "extremity radiographs, mostly upper extremity (wrist, hand, forearm)",
    "source": "the dataset's documentation (Kaggle 'Bone Fracture Binary Classification')",
    "out_of_scope_body_parts": list(NOT_EXTREMITY_BODY_PARTS),
}


def normalise_body_part(value: str | None) -> str | None:
    """Upper case, letters only ("Chest " -> "CHEST", "ABDOMEN-PELVIS" -> "ABDOMENPELVIS")."""
    if not value:
        return None
    letters = "".join(ch for ch in value.upper() if ch.isalpha())
    return letters or None


def out_of_scope(
    body_part: str | None, card: Mapping, description: str | None = None
) -> str | None:
    """The excluded anatomy term when the header says the image is outside the card's scope
    (BodyPartExamined, else a word of the study description), else None. A card without a
    `scope` section (older checkpoints) gets the default exclusions."""
    scope = card.get("scope") or {}
    excluded = set(scope.get("out_of_scope_body_parts", NOT_EXTREMITY_BODY_PARTS))
    part = normalise_body_part(body_part)
    if part is not None:
        return part if part in excluded else None
    for word in (description or "").split():
        term = normalise_body_part(word)
        if term in excluded:
            return term
    return None
