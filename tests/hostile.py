"""A corpus of hostile inputs made by code (nothing downloaded): every one must get a 4xx.

Each case is a request body plus headers; transport-level attacks (oversized bodies sent with
Content-Length or chunked, thousands of multipart parts, a trickled upload) are separate
functions because they need control over the socket.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
from conftest import (
    _png_chunk,
    colour_photo,
    corrupt_png_crc,
    gradient,
    make_apng,
    make_dicom,
    make_jpeg,
    make_other_format,
    make_png,
    make_png_header_only,
    radiograph,
)
from PIL import Image


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    multipart: bool = False  # send as multipart field `file` named like a PNG


def png_with_text_bomb(decompressed_mb: int = 64) -> bytes:
    """A valid PNG carrying a zTXt chunk that inflates to `decompressed_mb` MB."""
    png = make_png(radiograph())
    payload = b"Comment\x00\x00" + zlib.compress(b"A" * (decompressed_mb << 20), 9)
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + _png_chunk(b"zTXt", payload) + png[iend:]


def png_with_huge_text_chunk(size_mb: int = 4) -> bytes:
    png = make_png(radiograph())
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + _png_chunk(b"tEXt", b"Comment\x00" + b"x" * (size_mb << 20)) + png[iend:]


def png_chunk_length_past_eof() -> bytes:
    png = make_png(radiograph())
    at = png.index(b"IDAT") - 4
    return png[:at] + struct.pack(">I", 0x7FFFFFF0) + png[at + 4 :]


def cmyk_photo_jpeg() -> bytes:
    return make_jpeg(Image.fromarray(colour_photo()).convert("CMYK"))


def palette_colour_png() -> bytes:
    return make_png(Image.fromarray(colour_photo()).convert("P", palette=Image.ADAPTIVE))


def dicom_length_past_eof() -> bytes:
    data = make_dicom(pixels=(gradient(256, 256, np.uint16) >> 4))
    return data[: len(data) - 60_000]  # PixelData says 131072 bytes; far fewer follow


def dicom_huge_multiframe_claim() -> bytes:
    """Claims 100 000 frames of 4096x4096: bounded before any decode."""
    return make_dicom(
        pixels=(gradient(64, 64, np.uint16) >> 4), NumberOfFrames=100_000, Rows=4096, Columns=4096
    )


def zip_bytes() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("image.png", make_png(radiograph()))
    return buf.getvalue()


def body_cases() -> list[Case]:
    png, jpeg = make_png(radiograph()), make_jpeg(radiograph())
    ct = make_dicom(modality="CT", pixels=radiograph().astype(np.uint16))
    cases = [
        Case("empty-body", b""),
        Case("empty-multipart-file", b"", multipart=True),
        Case(
            "html-as-png",
            b"<!DOCTYPE html><html><script>alert(1)</script></html>",
            {"content-type": "image/png"},
        ),
        Case("json-as-dicom", b'{"PatientName": "x"}', {"content-type": "application/dicom"}),
        Case("zip-as-png", zip_bytes(), {"content-type": "image/png"}),
        Case("zip-as-png-multipart", zip_bytes(), multipart=True),
        Case(
            "pdf-as-jpeg",
            b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n",
            {"content-type": "image/jpeg"},
        ),
        Case("dicom-as-png-named-ct", ct, {"content-type": "image/png"}),
        Case("truncated-png", png[: len(png) // 3]),
        Case("truncated-jpeg", jpeg[: len(jpeg) // 3]),
        Case("png-signature-only", b"\x89PNG\r\n\x1a\n"),
        Case("jpeg-soi-only", b"\xff\xd8\xff"),
        Case("png-bad-crc", corrupt_png_crc(png)),
        Case("png-chunk-length-past-eof", png_chunk_length_past_eof()),
        Case("png-bomb-50k", make_png_header_only(50_000, 50_000)),
        Case("png-bomb-100k-x-1", make_png_header_only(100_000, 1)),
        Case("png-bomb-rgba16", make_png_header_only(30_000, 30_000, bit_depth=16, colour_type=6)),
        Case("png-ztxt-bomb", png_with_text_bomb()),
        Case("png-huge-text-chunk", png_with_huge_text_chunk()),
        Case("png16-constant", make_png(np.full((300, 240), 30_000, np.uint16))),
        Case("cmyk-colour-jpeg", cmyk_photo_jpeg()),
        Case("palette-colour-png", palette_colour_png()),
        Case("rgb-photo-jpeg", make_jpeg(colour_photo())),
        Case("one-by-one", make_png(np.full((1, 1), 128, np.uint8))),
        Case("one-by-20000", make_png(gradient(20_000, 1))),
        Case("gif", make_other_format("GIF")),
        Case("tiff", make_other_format("TIFF")),
        Case("bmp", make_other_format("BMP")),
        Case("webp", make_other_format("WEBP")),
        Case("apng", make_apng()),
        Case("dicom-no-preamble", make_dicom(preamble=False)),
        Case("dicom-no-pixels", make_dicom(with_pixels=False)),
        Case("dicom-length-past-eof", dicom_length_past_eof()),
        Case("dicom-ct", ct),
        Case("dicom-mr", make_dicom(modality="MR", pixels=radiograph().astype(np.uint16))),
        Case("dicom-us", make_dicom(modality="US", pixels=radiograph().astype(np.uint16))),
        Case("dicom-no-modality", make_dicom(modality=None, pixels=radiograph().astype(np.uint16))),
        Case("dicom-ybr-colour", make_dicom(photometric="YBR_FULL", pixels=radiograph())),
        Case("dicom-multiframe-bomb", dicom_huge_multiframe_claim()),
        Case("dicom-preamble-then-garbage", b"\0" * 128 + b"DICM" + b"\xff" * 64),
        Case("random-bytes", np.random.default_rng(0).bytes(4096)),
    ]
    return cases
