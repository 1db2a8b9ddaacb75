"""STOW-RS requests for the live app: a multipart/related body of DICOM instances."""

from __future__ import annotations

import uuid

import httpx

from orthovision.clinical.dicomweb import related_body, related_content_type

__all__ = ["related_body", "stow"]


def stow(client: httpx.Client, instances: list[bytes], **headers: str) -> httpx.Response:
    """POST the instances to /dicomweb/studies (extra headers by keyword, `_` for `-`)."""
    boundary = uuid.uuid4().hex
    head = {"content-type": related_content_type(boundary)}
    head |= {name.replace("_", "-"): value for name, value in headers.items()}
    return client.post("/dicomweb/studies", content=related_body(instances, boundary), headers=head)
