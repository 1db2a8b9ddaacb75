"""One-page PDF report of one prediction (reportlab): the result a reader takes away.

It carries the v1 result only (which holds no patient identifier: `DecodedImage.metadata()`
keeps none), never the stored DICOM source attributes.
"""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Sequence

from orthovision.clinical.figure import Figure

NOT_A_DIAGNOSIS = (
    "This report is a computer-generated second-opinion aid for a qualified reader. "
    "It is not a diagnosis."
)
INTENDED_USE = (
    "Intended use: a second opinion on adult extremity radiographs (mostly wrist, hand and "
    "forearm, the anatomy of the training data) for fracture versus no fracture, read by a "
    "qualified reader next to the images. Not for other anatomy, children's growing "
    "skeletons or tumour diagnosis (the tumour classes are not validated); the model "
    "abstains when an image is outside its scope or far from its training data."
)


HEAT_MAP_NOTE = (
    "The heat map shows where the model looked for its answer (GradCAM++), not where a "
    "lesion is; it is masked to the exposed field (docs/DESIGN.md, Heat maps)."
)


def _pct(p: float) -> str:
    return f"{100.0 * p:.1f}%"


def build_pdf_report(
    result: dict,
    figure: Figure | None,
    explanation_note: str | None = None,
    generated_at: dt.datetime | None = None,
    source_reference: dict | None = None,
    priors: Sequence[str] = (),
) -> bytes:
    """PDF bytes for a v1 prediction `result`. `figure` is the heat map (figure.py), or None
    with `explanation_note` saying why there is none."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import Image, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    body, h2 = styles["BodyText"], styles["Heading2"]
    small = styles["BodyText"].clone("small", fontSize=7.5, leading=9)
    h2 = h2.clone("h2tight", spaceBefore=6, spaceAfter=3)
    generated_at = generated_at or dt.datetime.now(dt.timezone.utc)
    model = result["model"]
    validated = list(result.get("validated_classes", []))

    def para(text: str, style=body) -> Paragraph:
        # reportlab Paragraphs take a mini-markup: escape what came from elsewhere.
        from xml.sax.saxutils import escape

        return Paragraph(escape(text), style)

    story = [
        para("OrthoVision second-opinion report", styles["Title"]),
        para(NOT_A_DIAGNOSIS, styles["Heading4"]),
        para(
            f"Request {result['request_id']} | result of "
            f"{generated_at.strftime('%Y-%m-%d %H:%M UTC')}"
        ),
        para("Image: " + describe_image(result.get("input", {}), source_reference)),
        Spacer(1, 4 * mm),
        para("Result", h2),
    ]
    if result.get("abstained") or not result.get("label"):
        reason = result.get("abstain_reason") or "no reason given"
        story.append(para(f"Predicted class: abstained ({reason})", styles["Heading3"]))
    else:
        story.append(para(f"Predicted class: {result['label']}", styles["Heading3"]))
    if result.get("ood_score") is not None:
        story.append(
            para(
                f"Out-of-distribution score: {result['ood_score']:.2f} (distance from the "
                "training data; the model abstains above its card's threshold)",
                small,
            )
        )

    branches = result.get("branches", {})
    header = ["class", "probability", *branches, "validated"]
    rows = [header]
    for name, p in result["probabilities"].items():
        rows.append(
            [
                name,
                _pct(p),
                *(_pct(b.get(name, 0.0)) for b in branches.values()),
                "yes" if name in validated else "NOT VALIDATED",
            ]
        )
    table = Table(rows, hAlign="LEFT")
    table.setStyle(
        TableStyle(
            [
                ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
                ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
                ("BACKGROUND", (0, 0), (-1, 0), colors.whitesmoke),
            ]
        )
    )
    story += [table, Spacer(1, 2 * mm)]
    story.append(para("Validated classes: " + (", ".join(validated) or "none")))
    if result.get("decision_threshold") is not None:
        story.append(
            para(
                f"Operating point: fracture is reported from a probability of "
                f"{result['decision_threshold']:.3f} (chosen on the validation split for a "
                "sensitivity of at least 0.90: a second opinion should rarely miss a "
                "fracture, at the cost of more false alarms)."
            )
        )
    story.append(para(INTENDED_USE, small))

    story.append(para("Input quality", h2))
    findings = result.get("quality", {}).get("findings", [])
    if not findings:
        story.append(para("No quality findings."))
    for f in findings:
        story.append(para(f"- {f['severity']}: {f['check']}: {f['message']}"))

    story.append(para("Heat map (GradCAM++)", h2))
    if figure:
        # At most 60 x 60 mm (the report stays one page), the image's own aspect ratio.
        scale = 60 * mm / max(figure.width, figure.height)
        size = {"width": figure.width * scale, "height": figure.height * scale}
        story.append(Image(io.BytesIO(figure.png), **size, hAlign="LEFT"))
        story.append(para(figure.caption))
        story.append(para(HEAT_MAP_NOTE, small))
    else:
        story.append(para(explanation_note or "No explanation was requested for this image."))

    if priors:
        story.append(para("Prior studies (same patient, same body part)", h2))
        story += [para(line) for line in priors]
    story.append(para("Model", h2))
    story.append(
        para(
            f"{model['name']} version {model['version']}"
            + ("" if model.get("trained", True) else " (UNTRAINED weights: outputs mean nothing)")
        )
    )
    story.append(para(f"weights sha256: {model['sha256']}"))
    story += [Spacer(1, 4 * mm), para(NOT_A_DIAGNOSIS, styles["Italic"])]

    buf = io.BytesIO()
    doc = SimpleDocTemplate(
        buf,
        pagesize=A4,
        title="OrthoVision second-opinion report",
        author="OrthoVision",
        leftMargin=18 * mm,
        rightMargin=18 * mm,
        topMargin=15 * mm,
        bottomMargin=15 * mm,
        invariant=True,  # no random document id: the same input gives the same bytes
    )

    def creation_date(canvas, _doc) -> None:
        # invariant=True stamps 2000-01-01: stamp the result's own time instead (the same
        # result still gives the same bytes).
        stamp = canvas._doc._timeStamp
        lt = generated_at.astimezone(dt.timezone.utc).timetuple()
        stamp.t, stamp.lt, stamp.YMDhms = generated_at.timestamp(), lt, tuple(lt)[:6]
        stamp.dhh = stamp.dmm = 0
        stamp.tzname = "UTC"

    doc.build(story, onFirstPage=creation_date)
    return buf.getvalue()


def describe_image(info: dict, source_reference: dict | None = None) -> str:
    """What the report is about, without a patient identifier: format, size, modality and
    body part, and for DICOM the instance's SOP Instance UID (the PACS's own key)."""
    parts = [str(info.get("format", "?")).upper()]
    size = info.get("original_size")
    if size:
        parts.append(f"{size[0]}x{size[1]} px")
    for key in ("modality", "body_part"):
        if info.get(key):
            parts.append(str(info[key]))
    text = ", ".join(parts)
    if source_reference and source_reference.get("SOPInstanceUID"):
        text += f"; SOP Instance UID {source_reference['SOPInstanceUID']}"
    return text
