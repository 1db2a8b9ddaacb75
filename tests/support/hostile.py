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
from PIL import Image

from support.images import (
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


# ------------------------------------------------------------------ decompression bombs
# Each is small on the wire and huge once decoded (issue: "decompression and pixel bombs").

DEFLATED = "1.2.840.10008.1.2.1.99"
PNG_SIG = b"\x89PNG\r\n\x1a\n"


def _split_meta(part10: bytes) -> tuple[bytes, bytes]:
    """(preamble + DICM + file meta group, data set) of a Part 10 file."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(part10)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return part10[: fp.tell()], part10[fp.tell() :]


def deflated_dicom_bomb(inflated_mb: int = 1024) -> bytes:
    """A Deflated Explicit VR LE file whose PixelData inflates to `inflated_mb` MiB of zeros
    (~1 KB on the wire per MiB): pydicom inflates it whole before any bound applies."""
    plain = make_dicom(pixels=gradient(64, 64, np.uint16) >> 4)
    meta, _ = _split_meta(make_dicom(transfer_syntax=DEFLATED))
    _, dataset = _split_meta(plain)
    pixel_tag = dataset.rindex(b"\xe0\x7f\x10\x00")
    size = inflated_mb << 20
    head = dataset[:pixel_tag] + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", size)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [deflater.compress(head)]
    zeros = bytes(1 << 20)
    out += [deflater.compress(zeros) for _ in range(inflated_mb)]
    out.append(deflater.flush())
    return meta + b"".join(out)


def deflated_dicom_small() -> bytes:
    """A well-formed deflated radiograph (the bound must not refuse honest files)."""
    return make_dicom(pixels=radiograph().astype(np.uint16) << 2, transfer_syntax=DEFLATED)


def _encapsulated_dicom(frame: bytes, transfer_syntax: str, rows: int, cols: int, bits: int):
    from pydicom.encaps import encapsulate

    data = make_dicom(pixels=np.zeros((rows, cols), np.uint16 if bits > 8 else np.uint8))
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _patch_j2k_size(codestream: bytes, width: int, height: int) -> bytes:
    assert codestream[:4] == b"\xff\x4f\xff\x51"
    return codestream[:8] + struct.pack(">II", width, height) + codestream[16:]


def _patch_sof(codestream: bytes, marker: int, width: int, height: int) -> bytes:
    at = codestream.index(bytes([0xFF, marker]))
    return codestream[: at + 5] + struct.pack(">HH", height, width) + codestream[at + 9 :]


def j2k_codestream_bomb(side: int = 40_000, header_side: int = 64) -> bytes:
    """JPEG 2000 DICOM: the header says 64x64, the codestream's SIZ says side x side."""
    buf = io.BytesIO()
    Image.fromarray(radiograph()[:header_side, :header_side]).save(
        buf, format="JPEG2000", no_jp2=True
    )
    frame = _patch_j2k_size(buf.getvalue(), side, side)
    return _encapsulated_dicom(frame, "1.2.840.10008.1.2.4.90", header_side, header_side, 8)


def jpegls_codestream_bomb(side: int = 16_000, header_side: int = 64) -> bytes:
    """JPEG-LS DICOM whose SOF55 declares side x side behind a 64x64 header."""
    import jpeg_ls

    frame = bytes(jpeg_ls.encode(np.ascontiguousarray(radiograph()[:header_side, :header_side])))
    frame = _patch_sof(frame, 0xF7, side, side)
    return _encapsulated_dicom(frame, "1.2.840.10008.1.2.4.80", header_side, header_side, 8)


def jpeg_codestream_bomb(side: int = 16_000, header_side: int = 64) -> bytes:
    """JPEG Baseline DICOM whose SOF0 declares side x side behind a 64x64 header."""
    frame = _patch_sof(make_jpeg(radiograph()[:header_side, :header_side]), 0xC0, side, side)
    return _encapsulated_dicom(frame, "1.2.840.10008.1.2.4.50", header_side, header_side, 8)


def png_of_zeros(width: int, height: int, depth: int = 8, colour_type: int = 6) -> bytes:
    """A valid all-zero PNG of any size, a few hundred KB on the wire however large."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\x00" + bytes(width * channels * depth // 8)
    z = zlib.compressobj(6)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    chunks = (b"IHDR", ihdr), (b"IDAT", idat), (b"IEND", b"")
    return PNG_SIG + b"".join(_png_chunk(kind, payload) for kind, payload in chunks)


def bomb_cases(deflated_mb: int = 512) -> list[Case]:
    """The decompression and pixel bombs, at a size CI can build in a few seconds."""
    dicom = {"content-type": "application/dicom"}
    return [
        Case("dicom-deflated-bomb", deflated_dicom_bomb(deflated_mb), dicom),
        Case("dicom-j2k-codestream-40000", j2k_codestream_bomb(40_000), dicom),
        Case("dicom-j2k-codestream-16000", j2k_codestream_bomb(16_000), dicom),
        Case("dicom-jpegls-codestream-16000", jpegls_codestream_bomb(16_000), dicom),
        Case("dicom-jpeg-codestream-16000", jpeg_codestream_bomb(16_000), dicom),
        # RGBA inside the pixel bound (49 MP) but ~0.5 GB once decoded and composited.
        Case("png-rgba-49mp", png_of_zeros(7_000, 7_000)),
    ]
