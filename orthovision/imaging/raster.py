"""PNG and JPEG decoding: chunk and marker walks bound the work before pixels are
allocated; metadata chunks are capped.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps

from orthovision.config import DecodeConfig
from orthovision.errors import (
    InputTooLarge,
    UndecodableImage,
    UnsupportedFormat,
)
from orthovision.imaging.pixels import (
    PIL_ERRORS,
    DecodedImage,
    check_decoded_bytes,
    check_pixel_bounds,
    integer_factor,
    pil_to_grey,
)

# A radiograph needs no megabytes of comments: such chunks only cost memory and time.
PNG_METADATA_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"iCCP"}
PNG_MAX_METADATA_BYTES = 1 << 20

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"


# PNG colour type -> channels after decoding (a palette may expand to RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}


def _png_bytes_per_pixel(depth: int, colour_type: int) -> int:
    """Pillow's buffer + our numpy copy + the composite, per pixel (measured peaks agree)."""
    channels = _PNG_CHANNELS.get(colour_type, 4)
    if channels == 1:
        return 2 * (2 if depth == 16 else 1) + (2 if depth == 16 else 0)
    pillow = 4  # Pillow keeps RGB, RGBA and LA in 32-bit pixels
    ours = channels * (2 if depth == 16 else 1)
    composite = 3 if channels in (2, 4) else 0
    return pillow + ours + composite


def _walk_png_chunks(data: bytes, cfg: DecodeConfig) -> None:
    """Check IHDR bounds and every chunk's length and CRC before Pillow decodes.

    Pillow does not verify IDAT CRCs, and the IHDR check here rejects a 50k x 50k bomb
    from 33 bytes of header.
    """
    pos = len(PNG_SIGNATURE)
    first = True
    metadata_bytes = 0
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise UndecodableImage("PNG chunk runs past the end of the file (truncated)")
        if kind in PNG_METADATA_CHUNKS:
            metadata_bytes += length
            if metadata_bytes > PNG_MAX_METADATA_BYTES:
                raise InputTooLarge(
                    f"PNG text/metadata chunks exceed {PNG_MAX_METADATA_BYTES} bytes"
                )
        if first:
            if kind != b"IHDR" or length != 13:
                raise UndecodableImage("PNG does not start with an IHDR chunk")
            width, height, depth, colour_type = struct.unpack(">IIBB", data[pos + 8 : pos + 18])
            check_pixel_bounds(width, height, cfg)
            check_decoded_bytes(width, height, _png_bytes_per_pixel(depth, colour_type), cfg)
            first = False
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise UndecodableImage("PNG chunk CRC mismatch (corrupt file)")
        if kind == b"IEND":
            return
        pos = end
    raise UndecodableImage("PNG ends without an IEND chunk (truncated)")


def decode_png(data: bytes, cfg: DecodeConfig, target: int) -> DecodedImage:
    _walk_png_chunks(data, cfg)
    try:
        img = Image.open(io.BytesIO(data), formats=["PNG"])
        if getattr(img, "is_animated", False):
            raise UnsupportedFormat("animated PNG (APNG) is not supported; send one frame")
        width, height = img.size
        check_pixel_bounds(width, height, cfg)
        source_mode = img.mode
        img.load()
    except Image.DecompressionBombError:
        raise InputTooLarge("PNG pixel count exceeds the decompression-bomb limit") from None
    except PIL_ERRORS:
        raise UndecodableImage("PNG image data cannot be decoded") from None
    channels = len(img.getbands())
    if source_mode == "P":
        channels = 4 if "transparency" in img.info else 3
    factor = integer_factor(width, height, target)
    grey, chroma = pil_to_grey(img, factor)
    return DecodedImage(
        pixels=np.ascontiguousarray(grey),
        format="png",
        original_size=(width, height),
        channels=channels,
        chroma=chroma,
        byte_size=len(data),
        photometric=source_mode,
        reduced_factor=factor,
    )


def decode_jpeg(data: bytes, cfg: DecodeConfig, target: int) -> DecodedImage:
    try:
        img = Image.open(io.BytesIO(data), formats=["JPEG"])
        width, height = img.size
        check_pixel_bounds(width, height, cfg)
        source_mode = img.mode
        channels = len(img.getbands())
        if target > 0:
            # DCT-domain scaling: Pillow picks the largest of 1/2, 1/4, 1/8 that keeps both
            # sides >= target. "L" for grey sources skips any colour conversion work.
            img.draft("L" if source_mode == "L" else source_mode, (target, target))
        # After draft: the size it will decode at (Pillow's buffer + our numpy copy).
        check_decoded_bytes(*img.size, 2 if img.mode == "L" else 4 + channels, cfg)
        img.load()
        decoded_width = img.size[0]
        # EXIF orientation after decoding (on the small image); original_size stays stored.
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError:
        raise InputTooLarge("JPEG pixel count exceeds the decompression-bomb limit") from None
    except PIL_ERRORS:
        raise UndecodableImage("JPEG image data cannot be decoded") from None
    dct_factor = max(1, round(width / decoded_width))
    # Any further integer reduction (never needed after draft, kept for target_side quirks).
    factor = integer_factor(img.size[0], img.size[1], target)
    grey, chroma = pil_to_grey(img, factor)
    return DecodedImage(
        pixels=np.ascontiguousarray(grey),
        format="jpeg",
        original_size=(width, height),
        channels=channels,
        chroma=chroma,
        byte_size=len(data),
        photometric=source_mode,
        reduced_factor=dct_factor * factor,
    )
