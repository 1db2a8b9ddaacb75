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
# Private coding scheme (PS3.16 8.2: designators starting "99" are local) for the project's
# own concepts: the four classes and the per-class probabilities.
SCHEME = "99ORTHOVISION"
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
    return _code(name, SCHEME, name.replace("-", " "))


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
            _code("weights-sha256", SCHEME, "Model weights SHA-256"), model["sha256"], contains
        ),
    ]


def _finding_items(result: dict, src) -> list:
    """One image's finding (or abstention and why), per-class probabilities, validated
    classes and its source image reference."""
    from highdicom.sr import CodeContentItem as Code
    from highdicom.sr import (
        ImageContentItem,
        NumContentItem,
        RelationshipTypeValues,
        TextContentItem,
    )

    contains = RelationshipTypeValues.CONTAINS
    validated = list(result.get("validated_classes", []))
    items = []
    if result.get("abstained") or not result.get("label"):
        finding = _code("abstained", SCHEME, "abstained")
        items.append(Code(_code("121071", "DCM", "Finding"), finding, contains))
        reason = str(result.get("abstain_reason") or "abstained")
        items.append(
            TextContentItem(_code("abstain-reason", SCHEME, "Abstain reason"), reason, contains)
        )
    else:
        label = result["label"]
        items.append(Code(_code("121071", "DCM", "Finding"), _class_code(label), contains))
    for name, p in result["probabilities"].items():
        mark = "" if name in validated else " (not validated)"
        concept = _code(f"p-{name}", SCHEME, f"Probability of {name}{mark}")
        items.append(NumContentItem(concept, float(p), _code(*UCUM_NO_UNITS), None, contains))
    items.append(
        TextContentItem(
            _code("validated-classes", SCHEME, "Validated classes"),
            ", ".join(validated) or "none",
            contains,
        )
    )
    items.append(
        ImageContentItem(
            _code("121112", "DCM", "Source of Measurement"),
            src.SOPClassUID,
            src.SOPInstanceUID,
            relationship_type=contains,
        )
    )
    return items


def _report(evidence: list, items: list, uid_seed: str, created_at: float):
    """The Comprehensive SR around a content tree's items: evidence, derived UIDs, the
    not-a-diagnosis comment, the local coding scheme, reproducible dates."""
    from highdicom.sr import (
        ComprehensiveSR,
        ContainerContentItem,
        ContentSequence,
        RelationshipTypeValues,
        TextContentItem,
    )

    contains = RelationshipTypeValues.CONTAINS
    comment = TextContentItem(_code("121106", "DCM", "Comment"), NOT_A_DIAGNOSIS, contains)
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
    sr.CodingSchemeIdentificationSequence = [_local_scheme()]
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
    from highdicom.sr import (
        ContainerContentItem,
        ContentSequence,
        ImageContentItem,
        NumContentItem,
        RelationshipTypeValues,
        TextContentItem,
    )

    contains = RelationshipTypeValues.CONTAINS
    sources = [source_dataset(source) for _result, source in instances]
    result = study["result"]
    items = [
        *_algorithm_items(instances[0][0]["model"]),
        TextContentItem(_code("study-rule", SCHEME, "Study rule"), result["rule"], contains),
    ]
    if result["fracture_probability"] is not None:
        concept = _code("p-study-fracture", SCHEME, "Study probability of fracture")
        value = float(result["fracture_probability"])
        items.append(NumContentItem(concept, value, _code(*UCUM_NO_UNITS), None, contains))
    by_request = {r["request_id"]: src for (r, _s), src in zip(instances, sources, strict=True)}
    driver = by_request.get(result["driving_request_id"] or "")
    if driver is not None:
        concept = _code("driving-view", SCHEME, "Driving view")
        items.append(
            ImageContentItem(
                concept, driver.SOPClassUID, driver.SOPInstanceUID, relationship_type=contains
            )
        )
    for (one, _source), src in zip(instances, sources, strict=True):
        view = ContainerContentItem(
            _code("image-finding", SCHEME, "Image finding"), relationship_type=contains
        )
        view.ContentSequence = ContentSequence(_finding_items(one, src), is_root=False)
        items.append(view)
    return _report(sources, items, seed, created_at)


def _local_scheme():
    """PS3.3 C.12.1.1.4: a private (99...) coding scheme is identified in the object."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "OrthoVision Serve local codes"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    return item


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
    # General Series Laterality (Type 2C, paired body parts): the source's, else present
    # and empty (unknown), never invented.
    sc.Laterality = source.get("Laterality") or None
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
