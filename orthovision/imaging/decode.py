"""Safe radiograph decoding from bytes: PNG, JPEG and DICOM Part 10.

Everything a client sends passes through `decode_radiograph`:
  1. sniff the format from signature bytes (never names or Content-Type);
  2. bound bytes and header-declared pixels before any full decode (decompression bombs);
  3. decode only the pixels needed: JPEG DCT-domain scaling, JPEG 2000 resolution levels,
     otherwise a full decode followed by an INTER_AREA downscale;
  4. return (H, W) uint8 grey with bone bright, plus JSON-safe metadata.

Errors are `orthovision.errors.InputError` subclasses whose messages are fixed text plus
safe facts (sizes, format, modality code). Library exception text is never forwarded: it
can quote header values, including patient identifiers.
"""

from __future__ import annotations

import warnings

from PIL import Image, ImageFile

from orthovision.config import DecodeConfig
from orthovision.errors import (
    EmptyInput,
    InputTooLarge,
    UnsupportedFormat,
)
from orthovision.imaging.dicom import DICOM_PREAMBLE_BYTES, decode_dicom
from orthovision.imaging.pixels import DecodedImage, resolve_target
from orthovision.imaging.raster import JPEG_SIGNATURE, PNG_SIGNATURE, decode_jpeg, decode_png

# A truncated upload must be an error, not a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own header bounds (DecodeConfig.max_pixels) run before Pillow decodes anything; its
# warning tier would only add log noise. Its error tier (2x its limit) is caught and mapped.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _looks_like_bare_dicom(data: bytes) -> bool:
    """A DICOM data set with no Part 10 preamble: starts at a group 0002/0008 tag."""
    if len(data) < 8 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    vr = data[4:6]
    return vr.isalpha() and vr.isupper() or data[2:4] in (b"\x00\x00", b"\x05\x00", b"\x16\x00")


def _describe_unknown(data: bytes) -> str:
    head = data[:16]
    known = (
        ((b"GIF87a", b"GIF89a"), "gif"),
        ((b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"), "tiff"),
        ((b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"), "zip archive"),
        ((b"%PDF",), "pdf"),
        ((b"BM",), "bmp"),
        ((b"\x1f\x8b",), "gzip"),
        ((b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  \r\n\x87\n"), "jpeg2000"),
        ((b"7z\xbc\xaf", b"Rar!"), "archive"),
    )
    for signatures, name in known:
        if head.startswith(signatures):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp":
        return "heif/avif/mp4 container"
    if _looks_like_bare_dicom(data):
        return "dicom without the 128-byte Part 10 preamble"
    text = data[:512].lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<"):
        return "html/xml text"
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return "unknown binary data"
    return "text"


def sniff_format(data: bytes) -> str:
    """Return "png", "jpeg" or "dicom" from signature bytes; raise UnsupportedFormat otherwise."""
    if not data:
        raise EmptyInput("empty request body: no image bytes")
    if data.startswith(PNG_SIGNATURE):
        return "png"
    if data.startswith(JPEG_SIGNATURE):
        return "jpeg"
    if data[DICOM_PREAMBLE_BYTES : DICOM_PREAMBLE_BYTES + 4] == b"DICM":
        return "dicom"
    raise UnsupportedFormat(
        f"unsupported image format ({_describe_unknown(data)}); accepted: PNG, JPEG, DICOM Part 10"
    )


# DecodeConfig is frozen (pydantic), so one shared default instance is safe.
_DEFAULT_DECODE_CONFIG = DecodeConfig()
_DECODERS = {"png": decode_png, "jpeg": decode_jpeg, "dicom": decode_dicom}


def decode_radiograph(
    data: bytes, cfg: DecodeConfig = _DEFAULT_DECODE_CONFIG, target_side: int | None = None
) -> DecodedImage:
    """Decode client bytes to a bounded grey radiograph.

    target_side: None -> cfg.min_decode_side_px; decode to the smallest size whose shorter
    side is still >= target_side (JPEG DCT scaling, JPEG 2000 resolution levels, else an
    integer INTER_AREA downscale). 0 -> full size.
    """
    if not data:
        raise EmptyInput("empty request body: no image bytes")
    if len(data) > cfg.max_bytes:
        raise InputTooLarge(f"body of {len(data)} bytes exceeds the limit of {cfg.max_bytes}")
    target = resolve_target(cfg, target_side)
    fmt = sniff_format(data)
    return _DECODERS[fmt](bytes(data), cfg, target)
