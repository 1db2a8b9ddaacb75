"""DICOM outputs for DICOM inputs: a Comprehensive SR with the classification and a Secondary
Capture of the heat-map overlay, both filed in the source's study (highdicom).

Patient and study attributes: a PACS files an object by its Patient and General Study modules
(PS3.3 C.7.1.1, C.7.2.1), so an SR about a study must carry the same PatientName, PatientID,
StudyInstanceUID, AccessionNumber... as the source. They are copied from the source (via
`DecodedImage.dicom_source`) into the objects themselves and nowhere else: no log line,
metric or error message of this module quotes them.

UIDs of the new objects derive from the request id (UUID-derived `2.25` UIDs, PS3.5 B.2), so
fetching the SR twice gives the same instance, which a PACS de-duplicates, not two copies.
"""

from __future__ import annotations

import datetime as dt
import io
import uuid

import numpy as np

from orthovision.imaging.dicom import DICOM_SOURCE_ATTRIBUTES, DICOM_SOURCE_UIDS

MANUFACTURER = "OrthoVision"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
NOT_A_DIAGNOSIS = (
    "Computer-generated second-opinion aid for a qualified reader; not a diagnosis. "
    "Classes outside the validated list are never reported."
)
# Standard codes only (SNOMED CT, DICOM, LOINC): a PACS and dciodvfy know them all, so no
# private scheme needs declaring. The class findings (PS3.16 codes where pydicom's code
# dictionary lists them; "Fracture of bone" and "Neoplasm, benign" are SNOMED CT concepts
# it does not list).
CLASS_CODES = {
    "fracture": ("125605004", "SCT", "Fracture of bone"),
    "non-affected": ("17621005", "SCT", "Normal"),
    "tumor-benign": ("3898006", "SCT", "Neoplasm, benign"),
    "tumor-malignant": ("86049000", "SCT", "Malignant neoplasm, primary"),
}
INDETERMINATE = ("82334004", "SCT", "Indeterminate")  # abstained: no finding reported
FINDING = ("121071", "DCM", "Finding")
PROBABILITY = ("122157", "DCM", "Probability")
COMMENT = ("121106", "DCM", "Comment")
ALGORITHM_PARAMETERS = ("111002", "DCM", "Algorithm Parameters")
SOURCE_OF_MEASUREMENT = ("121112", "DCM", "Source of Measurement")
SINGLE_IMAGE_FINDING = ("111059", "DCM", "Single Image Finding")
# BodyPartExamined defined terms without a left and right (PS3.16 Annex L, "Paired": no).
UNPAIRED_BODY_PARTS = frozenset(
    "ABDOMEN CHEST CHESTABDOMEN CSPINE TSPINE LSPINE SSPINE SPINE COCCYX SACRUM PELVIS "
    "SKULL HEAD HEADNECK NECK FACE JAW STERNUM WHOLEBODY".split()
)
UCUM_NO_UNITS = ("1", "UCUM", "no units")
_UID_NAMESPACE = uuid.UUID("7d1c1a36-5b4e-4b55-9d63-2c8a7e0f9b11")


class DicomOutputError(Exception):
    """The stored record cannot produce the object (no DICOM source, no explanation)."""


def derived_uid(request_id: str, role: str) -> str:
    """A stable UID per (request, role): `2.25.` + a name-based UUID as a decimal integer."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, f'{request_id}/{role}').int}"


def source_dataset(source: dict[str, str]):
    """The source's references and patient/study attributes as a pixel-less pydicom Dataset
    (highdicom's evidence / reference dataset)."""
    from pydicom.dataset import Dataset

    missing = [k for k in DICOM_SOURCE_UIDS if not source.get(k)]
    if missing:
        raise DicomOutputError("the source's DICOM references are incomplete")
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # values arrive as Python str; write UTF-8
    for keyword in (*DICOM_SOURCE_UIDS, *DICOM_SOURCE_ATTRIBUTES):
        if source.get(keyword):
            setattr(ds, keyword, source[keyword])
    # Type 2 attributes of the Patient and General Study modules: present, possibly empty.
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        if keyword not in ds:
            setattr(ds, keyword, None)
    for keyword in ("StudyDate", "StudyTime", "StudyID", "AccessionNumber"):
        if keyword not in ds:
            setattr(ds, keyword, None)
    if "ReferringPhysicianName" not in ds:
        ds.ReferringPhysicianName = None
    return ds


def _code(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning[:64])


def _class_code(name: str):
    return _code(*CLASS_CODES[name])


def _comment(text: str, relationship: str = "CONTAINS"):
    from highdicom.sr import TextContentItem

    return TextContentItem(_code(*COMMENT), text, relationship)


def _probability(name: str, p: float, note: str | None = None, evidence=None):
    """NUM "Probability" of one class: the class as a concept modifier (HAS CONCEPT MOD
    "Finding"), an optional note, an optional image it was inferred from."""
    from highdicom.sr import CodeContentItem, ContentSequence, NumContentItem

    item = NumContentItem(_code(*PROBABILITY), float(p), _code(*UCUM_NO_UNITS), None, "CONTAINS")
    children = [CodeContentItem(_code(*FINDING), _class_code(name), "HAS CONCEPT MOD")]
    if note:
        children.append(_comment(note, "HAS PROPERTIES"))
    if evidence is not None:
        children.append(evidence)
    item.ContentSequence = ContentSequence(children, is_root=False)
    return item


def _stamp(ds, created_at: float) -> None:
    """Every date/time of the object from the result's creation time, so that fetching it
    twice gives the same bytes (highdicom stamps 'now' by default)."""
    when = dt.datetime.fromtimestamp(created_at, tz=dt.timezone.utc)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    ds.ContentDate, ds.ContentTime = date, time
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.TimezoneOffsetFromUTC = "+0000"
    for item in ds.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S.%f+0000")
    if "TimeOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time


def _algorithm_items(model: dict) -> list:
    from highdicom.sr import RelationshipTypeValues, TextContentItem

    contains = RelationshipTypeValues.CONTAINS
    return [
        TextContentItem(_code("111001", "DCM", "Algorithm Name"), model["name"], contains),
        TextContentItem(_code("111003", "DCM", "Algorithm Version"), model["version"], contains),
        TextContentItem(
            _code(*ALGORITHM_PARAMETERS), f"weights sha256 {model['sha256']}", contains
        ),
    ]


def _image(src, relationship: str = "CONTAINS"):
    from highdicom.sr import ImageContentItem

    return ImageContentItem(
        _code(*SOURCE_OF_MEASUREMENT),
        src.SOPClassUID,
        src.SOPInstanceUID,
        relationship_type=relationship,
    )


def _finding_items(result: dict, src) -> list:
    """One image's finding (or "Indeterminate" and why it abstained), per-class
    probabilities (unvalidated ones marked), validated classes and the source image."""
    from highdicom.sr import CodeContentItem

    validated = list(result.get("validated_classes", []))
    items = []
    if result.get("abstained") or not result.get("label"):
        items.append(CodeContentItem(_code(*FINDING), _code(*INDETERMINATE), "CONTAINS"))
        reason = str(result.get("abstain_reason") or "abstained")
        items.append(_comment(f"Abstained: {reason}"))
    else:
        items.append(CodeContentItem(_code(*FINDING), _class_code(result["label"]), "CONTAINS"))
    for name, p in result["probabilities"].items():
        note = None if name in validated else f"{name} is not a validated class"
        items.append(_probability(name, p, note))
    items.append(_comment(f"Validated classes: {', '.join(validated) or 'none'}"))
    items.append(_image(src))
    return items


def _report(evidence: list, items: list, uid_seed: str, created_at: float):
    """The Comprehensive SR around a content tree's items: evidence, derived UIDs, the
    not-a-diagnosis comment, reproducible dates."""
    from highdicom.sr import (
        ComprehensiveSR,
        ContainerContentItem,
        ContentSequence,
    )

    comment = _comment(NOT_A_DIAGNOSIS)
    root = ContainerContentItem(_code("18748-4", "LN", "Diagnostic Imaging Report"))
    root.ContentSequence = ContentSequence([*items, comment], is_root=False)
    sr = ComprehensiveSR(
        evidence=evidence,
        content=root,
        series_instance_uid=derived_uid(uid_seed, "sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=derived_uid(uid_seed, "sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # no human verified it: a second opinion, not a signed report
        is_verified=False,
        series_description="OrthoVision AI result (not a diagnosis)",
    )
    sr.SpecificCharacterSet = "ISO_IR 192"
    _stamp(sr, created_at)
    return sr


def structured_report(result: dict, source: dict[str, str], created_at: float):
    """Comprehensive SR (TID 2000-like tree): finding, per-class probabilities, algorithm
    identification, the source image reference and the not-a-diagnosis statement."""
    src = source_dataset(source)
    items = [*_algorithm_items(result["model"]), *_finding_items(result, src)]
    return _report([src], items, result["request_id"], created_at)


def study_report(
    study: dict, instances: list[tuple[dict, dict[str, str]]], created_at: float, seed: str
):
    """Comprehensive SR of a study: the study result (its rule, the fracture probability of
    the driving view and that view's image) and one container per classified instance
    (its finding, probabilities and image), every instance in the evidence.

    `instances`: (v1 result, DICOM source) pairs of one study; `seed` makes the UIDs (the
    same instances give the same SR, a new instance a new one)."""
    from highdicom.sr import ContainerContentItem, ContentSequence

    sources = [source_dataset(source) for _result, source in instances]
    result = study["result"]
    items = [*_algorithm_items(instances[0][0]["model"]), _comment(f"Study rule: {result['rule']}")]
    by_request = {r["request_id"]: src for (r, _s), src in zip(instances, sources, strict=True)}
    driver = by_request.get(result["driving_request_id"] or "")
    if result["fracture_probability"] is not None:
        # The study's probability, inferred from its driving view's image.
        evidence = None if driver is None else _image(driver, "INFERRED FROM")
        items.append(_probability("fracture", result["fracture_probability"], evidence=evidence))
    for (one, _source), src in zip(instances, sources, strict=True):
        view = ContainerContentItem(_code(*SINGLE_IMAGE_FINDING), relationship_type="CONTAINS")
        view.ContentSequence = ContentSequence(_finding_items(one, src), is_root=False)
        items.append(view)
    return _report(sources, items, seed, created_at)


def read_findings(content) -> dict:
    """The finding and per-class probabilities back out of one content sequence (an image's
    items, or a study's top level): {"finding": class or None when abstained,
    "probabilities": {class: p}}. The inverse of `_finding_items`, for readers and tests."""
    by_code = {code: name for name, (code, _scheme, _meaning) in CLASS_CODES.items()}
    out: dict = {"finding": None, "probabilities": {}}
    for item in content:
        concept = item.ConceptNameCodeSequence[0].CodeValue
        if concept == FINDING[0] and item.ValueType == "CODE":
            out["finding"] = by_code.get(item.ConceptCodeSequence[0].CodeValue)
        elif concept == PROBABILITY[0]:
            modifier = next(c for c in item.ContentSequence if c.ValueType == "CODE")
            name = by_code[modifier.ConceptCodeSequence[0].CodeValue]
            out["probabilities"][name] = float(item.MeasuredValueSequence[0].NumericValue)
    return out


def secondary_capture(
    overlay_rgb: np.ndarray, result: dict, source: dict[str, str], created_at: float
):
    """Secondary Capture (RGB) of the heat-map overlay on the 224x224 model input."""
    from highdicom.sc import SCImage
    from pydicom.dataset import Dataset

    if overlay_rgb.ndim != 3 or overlay_rgb.shape[2] != 3 or overlay_rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 (H, W, 3), got {overlay_rgb.shape} {overlay_rgb.dtype}")
    src = source_dataset(source)
    request_id = result["request_id"]
    sc = SCImage.from_ref_dataset(
        ref_dataset=src,
        pixel_array=np.ascontiguousarray(overlay_rgb),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=derived_uid(request_id, "sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=derived_uid(request_id, "sc"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),  # placeholder: highdicom insists on a value
        transfer_syntax_uid="1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    )
    # PS3.3 C.8.6.2: Type 2C, present and empty when unknown (a letterboxed model input).
    sc.PatientOrientation = None
    # General Series Laterality (Type 2C, required for paired body parts): the source's;
    # absent for an unpaired body part; else present and empty (unknown), never invented.
    body_part = source.get("BodyPartExamined", "").upper()
    if source.get("Laterality"):
        sc.Laterality = source["Laterality"]
    elif body_part not in UNPAIRED_BODY_PARTS:
        sc.Laterality = None
    if body_part:
        sc.BodyPartExamined = body_part
    sc.SpecificCharacterSet = "ISO_IR 192"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "NO"
    sc.SeriesDescription = "OrthoVision heat map (not a diagnosis)"
    label = result.get("label") or "abstained"
    sc.DerivationDescription = (
        f"GradCAM++ heat map for {label}, blended over the 224x224 letterboxed CLAHE model "
        f"input; {result['model']['name']} {result['model']['version']}"
    )[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    _stamp(sc, created_at)
    return sc


def to_bytes(ds) -> bytes:
    """A Part 10 file (preamble, meta header)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
