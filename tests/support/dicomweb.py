"""STOW-RS requests for the live app: a multipart/related body of DICOM instances."""

from __future__ import annotations

import uuid

import httpx


def related_body(parts: list[bytes], boundary: str) -> bytes:
    out = b""
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


def stow(client: httpx.Client, instances: list[bytes], **headers: str) -> httpx.Response:
    """POST the instances to /dicomweb/studies (extra headers by keyword, `_` for `-`)."""
    boundary = uuid.uuid4().hex
    head = {"content-type": f'multipart/related; type="application/dicom"; boundary={boundary}'}
    head |= {name.replace("_", "-"): value for name, value in headers.items()}
    return client.post("/dicomweb/studies", content=related_body(instances, boundary), headers=head)
