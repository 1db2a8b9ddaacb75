"""Typed input errors. The ingress and the CLI map them to HTTP codes / exit codes in one place.

Messages are fixed text plus safe facts (sizes, formats, modality codes): never a value
read from a DICOM header that could identify a patient, and never a library's own
exception text, which may quote such values.
"""

from __future__ import annotations


class InputError(Exception):
    """Something about a client's input; always a 4xx, never a 500."""

    http_status = 400
    code = "bad_input"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class EmptyInput(InputError):
    http_status = 400
    code = "empty_input"


class InputTooLarge(InputError):
    """Byte size, pixel count (decompression bomb) or side length over the configured bound."""

    http_status = 413
    code = "too_large"


class BodyTimeout(InputError):
    """The upload did not finish within the configured time (a slow or stalled client)."""

    http_status = 408
    code = "body_timeout"


class UnsupportedFormat(InputError):
    http_status = 415
    code = "unsupported_format"


class UndecodableImage(InputError):
    """The signature is known but the content is corrupt or truncated."""

    http_status = 422
    code = "undecodable"


class NotARadiograph(InputError):
    """Decodes, but is not a projection radiograph (wrong modality, colour, no pixels)."""

    http_status = 422
    code = "not_a_radiograph"


class QualityRejected(InputError):
    http_status = 422
    code = "quality_rejected"
