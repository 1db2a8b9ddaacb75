"""DICOMweb STOW-RS pieces (PS3.18 10.5): the multipart/related body and the response.

Pure functions, no Ray: the ingress reads the (bounded) body, splits it here, classifies
each instance and answers with `stow_answer`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from orthovision.errors import InputError, InputTooLarge, UnsupportedFormat

DICOM_JSON = "application/dicom+json"
# PS3.18 10.5.3 Table 10.5.3-1 / PS3.4 Annex B failure reasons we use.
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
_PARAM = re.compile(r';\s*([A-Za-z0-9_-]+)\s*=\s*("([^"]*)"|[^;\s]+)')


@dataclass(frozen=True)
class Part:
    content_type: str
    data: bytes


def related_body(parts: Sequence[bytes], boundary: str) -> bytes:
    """A `multipart/related; type="application/dicom"` body of Part 10 instances (a STOW-RS
    request: the DICOM node's and the tests')."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    return b"".join(head + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()


def related_content_type(boundary: str) -> str:
    return f'multipart/related; type="application/dicom"; boundary={boundary}'


def related_boundary(content_type: str) -> str:
    """The boundary of a `multipart/related; type="application/dicom"` body, else an error
    (415 for another media type: PS3.18 10.5.1.2 accepts application/dicom here)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/related":
        raise UnsupportedFormat(
            'STOW-RS takes multipart/related; type="application/dicom" '
            f"(got {media[:64] or 'no content type'})"
        )
    params = {m.group(1).lower(): m.group(3) or m.group(2) for m in _PARAM.finditer(content_type)}
    kind = (params.get("type") or "application/dicom").lower()
    if kind != "application/dicom":
        raise UnsupportedFormat(
            "only application/dicom instances are accepted (no metadata/bulk data form)"
        )
    boundary = params.get("boundary")
    if not boundary or len(boundary) > 70:  # RFC 2046 5.1.1: 1 to 70 characters
        raise InputError("multipart/related body without a valid boundary parameter")
    return boundary


def split_related(body: bytes, boundary: str, max_parts: int) -> list[Part]:
    """The parts of a multipart body (RFC 2046), at most `max_parts` (else 413)."""
    delimiter = b"\r\n--" + boundary.encode("ascii", "replace")
    segments = (b"\r\n" + body).split(delimiter)
    parts: list[Part] = []
    closed = False
    for segment in segments[1:]:  # segments[0] is the preamble
        if segment.startswith(b"--"):
            closed = True
            break
        line_end = segment.find(b"\r\n")  # transport padding after the delimiter
        if line_end < 0:
            raise InputError("malformed multipart body: delimiter line not terminated")
        head_end = segment.find(b"\r\n\r\n", line_end)
        if head_end < 0:
            raise InputError("malformed multipart body: part headers not terminated")
        headers = segment[line_end + 2 : head_end]
        if len(parts) >= max_parts:
            raise InputTooLarge(f"STOW-RS request has more than {max_parts} instances")
        content_type = "application/dicom"
        for line in headers.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-type":
                content_type = value.decode("latin-1").strip().lower()
        parts.append(Part(content_type.split(";", 1)[0].strip(), segment[head_end + 4 :]))
    if not closed:
        raise InputError("malformed multipart body: no closing delimiter")
    return parts


def instance_indices(parts: Sequence[Part]) -> list[int]:
    """The parts to classify: typed application/dicom *and* signed DICOM Part 10, so a JPEG
    sent under the DICOM type is refused, not classified as an instance it is not."""
    return [
        i
        for i, p in enumerate(parts)
        if p.content_type == "application/dicom" and is_part10(p.data)
    ]


def not_an_instance() -> UnsupportedFormat:
    """The outcome of a part that `instance_indices` leaves out."""
    return UnsupportedFormat("STOW-RS parts must be application/dicom DICOM Part 10 instances")


def is_part10(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then "DICM"."""
    from orthovision.imaging.dicom import DICOM_PREAMBLE_BYTES

    return data[DICOM_PREAMBLE_BYTES : DICOM_PREAMBLE_BYTES + 4] == b"DICM"


@dataclass(frozen=True)
class InstanceHeader:
    """What the ingress reads of an instance before classifying it: its references, its
    study, and the patient id it hashes at once into a reference (never kept or shown)."""

    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_uid: str = ""
    patient_id: str = field(default="", repr=False)
    issuer: str = field(default="", repr=False)


_HEADER_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")
_HEADER_IDS = ("PatientID", "IssuerOfPatientID")


def instance_header(data: bytes, max_inflated: int = 64 << 20) -> InstanceHeader:
    """An instance's header fields ("" where unreadable or, for a UID, malformed).

    Only a DICOM Part 10 signature is parsed, and a deflated data set inflates through the
    decoder's capped stream (this runs in the ingress, on every part).
    """
    from pydicom.uid import UID

    from orthovision.imaging.dicom import read_dicom

    if not is_part10(data):
        return InstanceHeader()
    try:
        ds = read_dicom(
            data,
            max_inflated,
            stop_before_pixels=True,
            specific_tags=[*_HEADER_UIDS, *_HEADER_IDS],
        )
        uids = [str(ds.get(k, "") or "").strip() for k in _HEADER_UIDS]
        ids = [str(ds.get(k, "") or "").strip()[:64] for k in _HEADER_IDS]
    except Exception:  # any parse failure of a hostile header: just no header
        return InstanceHeader()
    valid = [v if v and UID(v).is_valid else "" for v in uids]
    return InstanceHeader(*valid, *ids)


def sop_reference(data: bytes, max_inflated: int = 64 << 20) -> tuple[str, str]:
    """(SOPClassUID, SOPInstanceUID) from an instance's header, "" where unreadable."""
    header = instance_header(data, max_inflated)
    return header.sop_class_uid, header.sop_instance_uid


@dataclass(frozen=True)
class StoredInstance:
    sop_class_uid: str
    sop_instance_uid: str
    retrieve_url: str | None = None


@dataclass(frozen=True)
class FailedInstance:
    sop_class_uid: str
    sop_instance_uid: str
    reason: int


def stow_response(stored: list[StoredInstance], failed: list[FailedInstance]) -> dict:
    """The PS3.18 JSON (Annex F) STOW-RS response data set."""
    from pydicom.dataset import Dataset

    def ref(item: StoredInstance | FailedInstance) -> Dataset:
        d = Dataset()
        d.ReferencedSOPClassUID = item.sop_class_uid or None
        d.ReferencedSOPInstanceUID = item.sop_instance_uid or None
        return d

    out = Dataset()
    if stored:
        seq = []
        for item in stored:
            d = ref(item)
            if item.retrieve_url:
                d.RetrieveURL = item.retrieve_url
            seq.append(d)
        out.ReferencedSOPSequence = seq
    if failed:
        seq = []
        for item in failed:
            d = ref(item)
            d.FailureReason = item.reason
            seq.append(d)
        out.FailedSOPSequence = seq
    return out.to_json_dict()


def stow_status(n_stored: int, n_failed: int) -> int:
    """PS3.18 10.5.3: 200 all stored, 202 some failed, 409 none stored."""
    if n_failed == 0:
        return 200
    return 202 if n_stored else 409


@dataclass(frozen=True)
class StowAnswer:
    status: int  # stow_status
    response: dict  # the PS3.18 JSON response data set (stow_response)
    results: list[dict]  # one v1 result or error per instance, in order


def stow_answer(
    refs: Sequence[tuple[str, str]],
    request_ids: Sequence[str],
    outcomes: Sequence[dict | InputError],
    sr_route: str,
) -> StowAnswer:
    """Assemble the answer from each instance's (SOPClassUID, SOPInstanceUID), request id
    and outcome (its v1 result, or the InputError that refused it). `sr_route` is the SR's
    route template (`{request_id}` in it), linked from each stored instance's result."""
    stored: list[StoredInstance] = []
    failed: list[FailedInstance] = []
    results = []
    for index, (rid, out, (sop_class, sop_uid)) in enumerate(
        zip(request_ids, outcomes, refs, strict=True)
    ):
        entry = {"index": index, "request_id": rid, "sop_instance_uid": sop_uid}
        if isinstance(out, InputError):
            reason = OUT_OF_RESOURCES if out.http_status >= 500 else CANNOT_UNDERSTAND
            failed.append(FailedInstance(sop_class, sop_uid, reason))
            entry["error"] = out.to_dict()
        else:
            stored.append(StoredInstance(sop_class, sop_uid))
            entry.update(out)
            entry["sr_url"] = sr_route.format(request_id=rid)
        results.append(entry)
    return StowAnswer(stow_status(len(stored), len(failed)), stow_response(stored, failed), results)


def dataset_only(accept: str) -> bool:
    """Whether the client accepts the bare response data set only (application/dicom+json
    without application/json), rather than `{"stow": ..., "results": [...]}`."""
    return DICOM_JSON in accept and "application/json" not in accept
