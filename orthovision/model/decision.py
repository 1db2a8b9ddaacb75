"""The decision rule on fused probabilities: reject threshold, operating point, and
never an unvalidated class as a finding. Torch-free (the Fusion replica runs it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from orthovision.labels import CLASSES


@dataclass(frozen=True)
class Decision:
    label: str | None  # None when abstaining
    abstained: bool
    reason: str | None
    top_class: str
    top_probability: float
    # Why it abstained, for machines: out_of_scope, out_of_distribution, unvalidated_class,
    # low_confidence (None when it did not).
    code: str | None = None


def decide(
    probabilities: Sequence[float],
    validated_classes: Sequence[str],
    abstain_threshold: float,
    classes: Sequence[str] = CLASSES,
    operating_point: Mapping | None = None,
) -> Decision:
    """Confidence-threshold reject rule (paper 5.3), the clinical operating point, and
    medical honesty.

    - The service never presents a class the checkpoint has no validated training data for
      as a finding: such a top class abstains with a reason instead.
    - `operating_point` ({"class": "fracture", "threshold": t}, chosen on validation for a
      target sensitivity) calls that class whenever its probability reaches t, even when
      another class is more probable: a second opinion should rarely miss a fracture.
      Probabilities are unchanged.
    - Otherwise the top class, unless its probability is below `abstain_threshold`.
    """
    top = max(range(len(classes)), key=lambda i: probabilities[i])
    top_class, top_p = classes[top], float(probabilities[top])
    if top_class not in validated_classes:
        reason = f"top class {top_class!r} is not validated for this model"
        return Decision(None, True, reason, top_class, top_p, "unvalidated_class")
    op_class = (operating_point or {}).get("class")
    if op_class in validated_classes and op_class in classes:
        k = list(classes).index(op_class)
        if float(probabilities[k]) >= float(operating_point["threshold"]):
            return Decision(op_class, False, None, top_class, top_p)
        # Below the operating point: the most probable of the other classes.
        top = max((i for i in range(len(classes)) if i != k), key=lambda i: probabilities[i])
        top_class, top_p = classes[top], float(probabilities[top])
        if top_class not in validated_classes:
            reason = f"top class {top_class!r} is not validated for this model"
            return Decision(None, True, reason, top_class, top_p, "unvalidated_class")
    if top_p < abstain_threshold:
        # Truncated, not rounded: 0.4996 must not read "0.500 below 0.500".
        shown = math.floor(top_p * 1000) / 1000
        reason = f"confidence {shown:.3f} is below the abstain threshold {abstain_threshold:.3f}"
        return Decision(None, True, reason, top_class, top_p, "low_confidence")
    return Decision(top_class, False, None, top_class, top_p)
