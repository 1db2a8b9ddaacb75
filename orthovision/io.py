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

import io
import logging
import math
import struct
import warnings
import zlib
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
from PIL import Image, ImageFile, ImageOps

from orthovision.config import DecodeConfig
from orthovision.errors import (
    EmptyInput,
    InputTooLarge,
    NotARadiograph,
    UndecodableImage,
    UnsupportedFormat,
)

# A truncated upload must be an error, not a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own header bounds (DecodeConfig.max_pixels) run before Pillow decodes anything; its
# warning tier would only add log noise. Its error tier (2x its limit) is caught and mapped.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# pydicom's own log records and warnings may quote header values (a patient's name in a
# malformed element): none of them may reach a log line (docs/DESIGN.md). Our typed errors say
# what went wrong instead.
# `disabled` alone stops only records of the "pydicom" logger itself; its children
# ("pydicom.pixels.decoders.base" logs a traceback per failed decoder) inherit the level,
# which pydicom.config resets to WARNING on import: import it first, then silence.
import pydicom.config  # noqa: E402, F401

logging.getLogger("pydicom").disabled = True
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"
DICOM_PREAMBLE_BYTES = 128  # DICOM PS3.10 7.1: 128-byte preamble, then "DICM"

# Errors Pillow raises on corrupt or hostile PNG/JPEG streams (truncation, bad markers,
# bad EXIF, zlib errors surface as OSError / SyntaxError / ValueError / struct.error).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError, TypeError)

# Errors pydicom's parser raises on hostile files (bad VRs, lengths, encodings).
_DICOM_PARSE_ERRORS = (
    EOFError,
    OSError,
    ValueError,
    struct.error,
    KeyError,
    TypeError,
    IndexError,
    AttributeError,
    NotImplementedError,
    OverflowError,
    UnicodeError,
    RecursionError,
)

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_UNDEFINED_LENGTH = 0xFFFFFFFF
# DICOM without a preamble: no window set; percentiles ignore collimator edges and
# burnt-in markers that a plain min/max would let dominate the grey range.
_AUTO_WINDOW_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (H, W) uint8 grey, C-contiguous, bone bright
    format: str  # "png" | "jpeg" | "dicom"
    original_size: tuple[int, int]  # (width, height) as stored, before reduced decoding
    channels: int  # channels in the source
    chroma: float  # mean |colour - grey| (0..255) over the decoded pixels; 0.0 for grey
    byte_size: int
    modality: str | None = None
    body_part: str | None = None
    photometric: str | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    bits_stored: int | None = None
    frames: int = 1
    frame_index: int = 0
    transfer_syntax: str | None = None
    reduced_factor: int = 1
    # DICOM inputs only: the source's UIDs and its patient/study module attributes, for
    # DICOM outputs (SR, SC) filed beside the source. May identify a patient: never in
    # metadata(), repr, logs or errors.
    dicom_source: dict[str, str] | None = field(default=None, repr=False, compare=False)

    def metadata(self) -> dict:
        """JSON-safe dict of everything but the pixels and the DICOM source (no patient
        identifiers are kept)."""
        meta = asdict(self)
        meta.pop("pixels")
        meta.pop("dicom_source")
        for key in ("original_size", "pixel_spacing_mm"):
            if meta[key] is not None:
                meta[key] = list(meta[key])
        return meta


# --------------------------------------------------------------------------- sniffing


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


# --------------------------------------------------------------------------- shared helpers


def _check_pixel_bounds(width: int, height: int, cfg: DecodeConfig, frames: int = 1) -> None:
    if width <= 0 or height <= 0:
        raise UndecodableImage(f"image header declares an empty size ({width}x{height})")
    if max(width, height) > cfg.max_side_px:
        raise InputTooLarge(
            f"image side {max(width, height)} px exceeds the limit of {cfg.max_side_px} px"
        )
    if width * height * frames > cfg.max_pixels:
        raise InputTooLarge(
            f"image declares {width}x{height}x{frames} pixels, over the limit of "
            f"{cfg.max_pixels} pixels"
        )


def _check_decoded_bytes(width: int, height: int, bytes_per_pixel: int, cfg: DecodeConfig) -> None:
    """Refuse a decode whose estimated peak memory is over `cfg.max_decode_bytes`."""
    estimate = width * height * bytes_per_pixel
    if estimate > cfg.max_decode_bytes:
        raise InputTooLarge(
            f"decoding {width}x{height} pixels at {bytes_per_pixel} bytes each needs "
            f"~{estimate >> 20} MiB, over the limit of {cfg.max_decode_bytes >> 20} MiB"
        )


def _resolve_target(cfg: DecodeConfig, target_side: int | None) -> int:
    if target_side is None:
        return cfg.min_decode_side_px
    if target_side < 0:
        raise ValueError("target_side must be >= 0 (0 = full size)")
    return target_side


def _integer_factor(width: int, height: int, target: int) -> int:
    """Largest integer factor keeping the shorter side >= target (1 = no reduction)."""
    if target <= 0:
        return 1
    return max(1, min(width, height) // target)


def _downscale(arr: np.ndarray, factor: int) -> np.ndarray:
    """INTER_AREA by an integer factor (block mean), keeping the shorter side >= target."""
    if factor <= 1:
        return arr
    height, width = arr.shape[:2]
    size = (math.ceil(width / factor), math.ceil(height / factor))
    if arr.dtype in (np.uint8, np.uint16, np.int16, np.float32, np.float64):
        return cv2.resize(arr, size, interpolation=cv2.INTER_AREA)
    # cv2 has no INTER_AREA for 32-bit ints; go through float64 (exact for < 2**53).
    out = cv2.resize(arr.astype(np.float64), size, interpolation=cv2.INTER_AREA)
    return np.rint(out).astype(arr.dtype)


def _rgb_to_grey(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """ITU-R BT.601 luma (cv2 uses the 601 weights) and mean |channel - luma| as chroma."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    deviation = np.abs(rgb.astype(np.int16) - grey[..., None].astype(np.int16))
    return grey, float(deviation.mean())


def _composite_on_black(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Radiograph background is black: transparent pixels become 0.

    In bands of rows, so the 16-bit intermediates never cost more than a band.
    """
    out = np.empty(colour.shape, np.uint8)
    for r in range(0, colour.shape[0], _BAND_ROWS):
        a = alpha[r : r + _BAND_ROWS].astype(np.uint16)
        if colour.ndim == 3:
            a = a[..., None]
        band = colour[r : r + _BAND_ROWS].astype(np.uint16)
        out[r : r + _BAND_ROWS] = (band * a + 127) // 255
    return out


_BAND_ROWS = 256


def _rescale_to_uint8(arr: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(arr.shape, np.uint8)
    scaled = (arr.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _pil_to_grey(img: Image.Image, factor: int) -> tuple[np.ndarray, float]:
    """Any loaded Pillow PNG/JPEG image -> (grey uint8 downscaled by `factor`, chroma)."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "1":
        img = img.convert("L")
        mode = "L"
    elif mode == "CMYK":  # Pillow undoes Adobe's inverted CMYK while decoding
        img = img.convert("RGB")
        mode = "RGB"

    arr = np.asarray(img)
    img.close()  # the numpy copy is all we need: free Pillow's buffer before the copies
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        raw = arr
        # 16-bit grey: the image's own [min, max] maps linearly onto 0..255.
        low, high = float(raw.min()), float(raw.max())
        return _rescale_to_uint8(_downscale(raw, factor), low, high), 0.0
    if mode == "L":
        return _downscale(arr, factor), 0.0
    if mode == "LA":
        return _downscale(_composite_on_black(arr[..., 0], arr[..., 1]), factor), 0.0
    if mode == "RGBA":
        rgb = _composite_on_black(arr[..., :3], arr[..., 3])
        return _rgb_to_grey(_downscale(rgb, factor))
    if mode == "RGB":
        return _rgb_to_grey(_downscale(arr, factor))
    raise UnsupportedFormat(f"unsupported pixel mode {mode}")


# --------------------------------------------------------------------------- PNG


# A radiograph needs no megabytes of comments: such chunks only cost memory and time.
PNG_METADATA_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"iCCP"}
PNG_MAX_METADATA_BYTES = 1 << 20


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
            _check_pixel_bounds(width, height, cfg)
            _check_decoded_bytes(width, height, _png_bytes_per_pixel(depth, colour_type), cfg)
            first = False
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise UndecodableImage("PNG chunk CRC mismatch (corrupt file)")
        if kind == b"IEND":
            return
        pos = end
    raise UndecodableImage("PNG ends without an IEND chunk (truncated)")


def _decode_png(data: bytes, cfg: DecodeConfig, target: int) -> DecodedImage:
    _walk_png_chunks(data, cfg)
    try:
        img = Image.open(io.BytesIO(data), formats=["PNG"])
        if getattr(img, "is_animated", False):
            raise UnsupportedFormat("animated PNG (APNG) is not supported; send one frame")
        width, height = img.size
        _check_pixel_bounds(width, height, cfg)
        source_mode = img.mode
        img.load()
    except Image.DecompressionBombError:
        raise InputTooLarge("PNG pixel count exceeds the decompression-bomb limit") from None
    except _PIL_ERRORS:
        raise UndecodableImage("PNG image data cannot be decoded") from None
    channels = len(img.getbands())
    if source_mode == "P":
        channels = 4 if "transparency" in img.info else 3
    factor = _integer_factor(width, height, target)
    grey, chroma = _pil_to_grey(img, factor)
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


# --------------------------------------------------------------------------- JPEG


def _decode_jpeg(data: bytes, cfg: DecodeConfig, target: int) -> DecodedImage:
    try:
        img = Image.open(io.BytesIO(data), formats=["JPEG"])
        width, height = img.size
        _check_pixel_bounds(width, height, cfg)
        source_mode = img.mode
        channels = len(img.getbands())
        if target > 0:
            # DCT-domain scaling: Pillow picks the largest of 1/2, 1/4, 1/8 that keeps both
            # sides >= target. "L" for grey sources skips any colour conversion work.
            img.draft("L" if source_mode == "L" else source_mode, (target, target))
        # After draft: the size it will decode at (Pillow's buffer + our numpy copy).
        _check_decoded_bytes(*img.size, 2 if img.mode == "L" else 4 + channels, cfg)
        img.load()
        decoded_width = img.size[0]
        # EXIF orientation after decoding (on the small image); original_size stays stored.
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError:
        raise InputTooLarge("JPEG pixel count exceeds the decompression-bomb limit") from None
    except _PIL_ERRORS:
        raise UndecodableImage("JPEG image data cannot be decoded") from None
    dct_factor = max(1, round(width / decoded_width))
    # Any further integer reduction (never needed after draft, kept for target_side quirks).
    factor = _integer_factor(img.size[0], img.size[1], target)
    grey, chroma = _pil_to_grey(img, factor)
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


# --------------------------------------------------------------------------- DICOM

# What a DICOM output (SR, Secondary Capture) needs to be filed beside its source: the
# source's references, plus the Patient and General Study modules (PS3.3 C.7.1.1, C.7.2.1),
# which a PACS matches on. Value Representation maximum lengths (PS3.5 6.2) bound each value.
DICOM_SOURCE_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
DICOM_SOURCE_ATTRIBUTES = {
    "PatientName": 64 * 5,
    "PatientID": 64,
    "IssuerOfPatientID": 64,
    "PatientBirthDate": 8,
    "PatientSex": 16,
    "StudyDate": 8,
    "StudyTime": 16,
    "StudyID": 16,
    "AccessionNumber": 16,
    "ReferringPhysicianName": 64 * 5,
    "StudyDescription": 64,
    "SeriesNumber": 12,
    "Laterality": 16,
}


DEFLATED_TRANSFER_SYNTAX = "1.2.840.10008.1.2.1.99"


def read_dicom(data: bytes, max_inflated: int, **dcmread_kwargs):
    """pydicom.dcmread of client bytes, with the Deflated transfer syntax inflated through a
    capped stream first (pydicom inflates the whole data set with no bound: a 1 MB upload
    can become gigabytes). Raises InputTooLarge past `max_inflated` bytes.
    """
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        deflated = str(meta.get("TransferSyntaxUID", "")) == DEFLATED_TRANSFER_SYNTAX
    except _DICOM_PARSE_ERRORS:
        deflated = False  # dcmread below reports the broken header its own way
    if deflated:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            inflated = inflater.decompress(data[fp.tell() :], max_inflated + 1)
        except zlib.error:
            raise UndecodableImage("deflated DICOM data set cannot be inflated") from None
        if len(inflated) > max_inflated or inflater.unconsumed_tail:
            raise InputTooLarge(
                f"deflated DICOM data set inflates past {max_inflated} bytes (compression bomb)"
            )
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out = io.BytesIO()
        out.write(data[:DICOM_PREAMBLE_BYTES] + b"DICM")
        write_file_meta_info(out, meta, enforce_standard=False)
        out.write(inflated)
        data = out.getvalue()
    return pydicom.dcmread(io.BytesIO(data), **dcmread_kwargs)


# ------------------------------------------------------------------ codestream dimensions

# Start of Frame markers of ITU-T T.81 (JPEG: all but DHT C4, JPG C8, DAC CC) and T.87
# (JPEG-LS: F7). Each segment: length(2) precision(1) Y(2) X(2) components(1).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"


def codestream_geometry(frame: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) a compressed frame declares itself, or None when it is
    not a JPEG / JPEG-LS / JPEG 2000 codestream (RLE and others carry no geometry).

    The header's Rows/Columns bound the decode only if the codestream agrees: a decoder
    allocates what the codestream says, so a 2 KB file can declare 40000 x 40000.
    """
    if frame.startswith(_J2K_SOC_SIZ):
        if len(frame) < 42:
            raise UndecodableImage("JPEG 2000 codestream is truncated")
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", frame[8:24])
        (csiz,) = struct.unpack(">H", frame[40:42])
        return xsiz - xosiz, ysiz - yosiz, csiz
    if frame.startswith(b"\x00\x00\x00\x0cjP  "):  # a JP2 file wrapped in the frame
        start = frame.find(_J2K_SOC_SIZ, 0, 1 << 16)
        return codestream_geometry(frame[start:]) if start >= 0 else None
    if not frame.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(frame):
        if frame[pos] != 0xFF:
            raise UndecodableImage("JPEG codestream has a malformed marker segment")
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack(">H", frame[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS:
            if pos + 10 > len(frame):
                break
            rows, cols = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return cols, rows, frame[pos + 9]
        if marker == 0xDA or length < 2:  # scan data before any frame header
            break
        pos += 2 + length
    raise UndecodableImage("JPEG codestream has no frame header")


def _first_frame(ds, frames: int, rows: int, cols: int) -> bytes:
    """The first compressed frame, refused when its codestream declares another size than
    the header (the decoders would allocate the codestream's size)."""
    import pydicom

    try:
        frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=frames)
    except Exception:  # noqa: BLE001 - any broken encapsulation is the client's
        raise UndecodableImage("DICOM encapsulated pixel data cannot be read") from None
    geometry = codestream_geometry(bytes(frame[: 1 << 16]))
    if geometry is not None and geometry != (cols, rows, 1):
        width, height, components = geometry
        raise UndecodableImage(
            f"compressed pixel data declares {width}x{height}x{components}, "
            f"the header {cols}x{rows}x1"
        )
    return frame


def _dicom_source(ds) -> dict[str, str] | None:
    """The source references and patient/study attributes as plain strings, or None when a
    reference UID is missing or malformed (then no DICOM output can point at the source)."""
    from pydicom.uid import UID

    source: dict[str, str] = {}
    for keyword in DICOM_SOURCE_UIDS:
        value = str(ds.get(keyword, "") or "").strip()
        if not value or not UID(value).is_valid:
            return None
        source[keyword] = value
    for keyword, max_len in DICOM_SOURCE_ATTRIBUTES.items():
        value = ds.get(keyword)
        if value is not None and str(value).strip():
            source[keyword] = str(value).strip()[:max_len]
    return source


def _check_element_lengths(ds) -> None:
    """pydicom silently shortens a value whose length runs past EOF; we refuse the file."""
    from pydicom.dataelem import RawDataElement

    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement) or raw.length == _UNDEFINED_LENGTH:
            continue
        if raw.value is not None and len(raw.value) < raw.length:
            raise UndecodableImage("DICOM element length runs past the end of the file")


def _first_value(value: object) -> float:
    """Window Center/Width may be multi-valued (alternative views): take the first."""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0]  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def _window(values: np.ndarray, ds) -> np.ndarray:
    """VOI stage -> float32 in [0, 1]. DICOM PS3.3 C.11.2.1.2 (LINEAR, LINEAR_EXACT, SIGMOID)."""
    from pydicom.pixels import apply_voi

    if ds.get("VOILUTSequence"):
        lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        out = apply_voi(np.rint(values).astype(np.int64), ds, index=0).astype(np.float32)
        return np.clip((out - lut.min()) / max(float(lut.max() - lut.min()), 1.0), 0, 1)
    low, high = (float(v) for v in np.percentile(values, _AUTO_WINDOW_PERCENTILES))
    window = None
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        window = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
    # A stored window that misses the data entirely (seen in real files whose header window
    # belongs to another rendering) would give a constant image: use the auto window then.
    if window is not None and window[0] - window[1] / 2 < high and window[0] + window[1] / 2 > low:
        c, w = window
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        x = values.astype(np.float32)
        if function == "SIGMOID" and w > 0:
            return (1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))).astype(np.float32)
        if function == "LINEAR_EXACT" and w > 0:
            return np.clip((x - c) / w + 0.5, 0, 1)
        if w >= 1:  # LINEAR requires width >= 1
            if w == 1:
                return (x > c - 0.5).astype(np.float32)
            return np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    if high <= low:
        return np.zeros(values.shape, np.float32)
    return np.clip((values.astype(np.float32) - low) / np.float32(high - low), 0, 1)


def _j2k_reduced(frame: bytes, ds, target: int) -> tuple[np.ndarray, int] | None:
    """Decode a JPEG 2000 codestream at a lower resolution level, or None to fall back.

    pylibjpeg-openjpeg 2.6 exposes no resolution-reduction parameter, so this uses Pillow's
    JPEG 2000 plugin (same libopenjp2) with `reduce`, on the DICOM-internal codestream only
    (never on client-sniffed bytes). Pillow refuses some valid streams at deep levels (e.g.
    a lossy one at reduce >= 2 that it reads at reduce 1): shallower levels are tried, then
    the full pydicom decode.
    """
    from openjpeg.utils import get_parameters

    rows, cols = int(ds.Rows), int(ds.Columns)
    deepest = 0
    while target > 0 and min(rows, cols) >> (deepest + 1) >= target and deepest < 5:
        deepest += 1
    if deepest == 0 or not frame.startswith(b"\xff\x4f\xff\x51"):
        return None
    try:
        params = get_parameters(frame)
    except (RuntimeError, ValueError):
        return None
    if (
        params["samples_per_pixel"] != 1
        or params["is_signed"]
        or (params["rows"], params["columns"]) != (rows, cols)
        # 16-bit streams: Pillow rejected the one we have at every level, full size included
        # (pydicom's decoder reads it); trying would only add to the fallback's cost.
        or not 1 <= int(params["precision"]) <= 15
    ):
        return None
    # Pillow refuses some streams at deep levels but not at shallower ones: step up.
    for level in range(deepest, 0, -1):
        try:
            img = Image.open(io.BytesIO(frame), formats=["JPEG2000"])
            img.reduce = level
            img.load()
            break
        except (OSError, SyntaxError, ValueError, struct.error, Image.DecompressionBombError):
            continue
    else:
        return None
    arr = np.asarray(img)
    if arr.dtype == np.uint16:  # precision <= 15 here
        # Pillow scales samples up to 16 bits; undo it to get stored values.
        arr = arr >> (16 - int(params["precision"]))
    return arr, 1 << level


# CharLS (pyjpegls) decodes JPEG-LS about 3x faster than pylibjpeg-libjpeg, which pydicom
# would otherwise pick first; the output is the same (lossless, or the same near-lossless).
_PREFERRED_DECODER = {
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS Near-Lossless
}


def _decode_dicom(data: bytes, cfg: DecodeConfig, target: int) -> DecodedImage:
    import pydicom
    from pydicom.errors import BytesLengthException, InvalidDicomError
    from pydicom.pixels import apply_modality_lut, pixel_array

    parse_errors = (InvalidDicomError, BytesLengthException, *_DICOM_PARSE_ERRORS)

    try:
        ds = read_dicom(data, cfg.max_bytes)
        _check_element_lengths(ds)
        modality = str(ds.get("Modality", "") or "").strip().upper() or None
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper() or None
        has_pixels = "PixelData" in ds
        ts_uid = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        source = _dicom_source(ds)
    except parse_errors:
        raise UndecodableImage("DICOM file cannot be parsed") from None

    accepted = ", ".join(cfg.allowed_modalities)
    if modality is None:
        raise NotARadiograph(f"DICOM file has no Modality; accepted: {accepted}")
    if modality not in cfg.allowed_modalities:
        # Modality is a short code string; keep only safe characters in the message.
        code = "".join(ch for ch in modality if ch.isalnum())[:16]
        raise NotARadiograph(
            f"modality {code} is not a projection radiograph; accepted: {accepted}"
        )
    if not has_pixels:
        raise NotARadiograph("DICOM file has no pixel data")
    if photometric not in _MONOCHROME:
        raise NotARadiograph("colour DICOM is not a greyscale radiograph")
    if ts_uid is None:
        raise UndecodableImage("DICOM file has no transfer syntax")

    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits_allocated = int(ds.BitsAllocated)
        bits_stored = int(ds.get("BitsStored", bits_allocated) or bits_allocated)
        body_part = ds.get("BodyPartExamined")
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        spacing_mm = (float(spacing[0]), float(spacing[1])) if spacing else None
        ts_name = ts_uid.name if ts_uid.is_valid else None
        compressed = ts_uid.is_compressed
        pixel_bytes = len(ds.PixelData)
    except parse_errors:
        raise UndecodableImage("DICOM image attributes are missing or invalid") from None
    if samples != 1:
        raise NotARadiograph("colour DICOM is not a greyscale radiograph")
    _check_pixel_bounds(cols, rows, cfg, frames)
    sample_bytes = max(1, (bits_allocated + 7) // 8)
    # Codecs (openjpeg, libjpeg, CharLS) work in 32-bit samples, then hand back the array.
    _check_decoded_bytes(cols, rows, sample_bytes + (4 if compressed else 0), cfg)
    frame = None
    if compressed:
        frame = _first_frame(ds, frames, rows, cols)
    else:
        expected = rows * cols * frames * ((bits_allocated + 7) // 8)
        if bits_allocated == 1:
            expected = math.ceil(rows * cols * frames / 8)
        if pixel_bytes < expected:
            raise UndecodableImage("DICOM pixel data is shorter than Rows x Columns x frames")

    raw: np.ndarray | None = None
    factor = 1
    try:
        if ts_uid in pydicom.uid.JPEG2000TransferSyntaxes and target > 0 and frame:
            reduced = _j2k_reduced(frame, ds, target)
            if reduced is not None:
                raw, factor = reduced
        if raw is None:
            # First frame only; the decoder plugins (pylibjpeg, numpy) mask unused high bits.
            raw = pixel_array(ds, index=0, decoding_plugin=_PREFERRED_DECODER.get(ts_uid, ""))
    # Decoder plugins raise many unrelated types on corrupt streams: map them all to a 422.
    except Exception:
        raise UndecodableImage("DICOM pixel data cannot be decoded") from None
    if raw.ndim != 2:
        raise UndecodableImage("DICOM pixel data cannot be decoded")

    # Downscale the stored values first: LUTs are pointwise, so windowing the small image
    # gives the same picture at a fraction of the cost (and matches the J2K reduced path).
    extra = _integer_factor(raw.shape[1], raw.shape[0], target)
    raw = _downscale(raw, extra)
    factor *= extra
    try:
        values = apply_modality_lut(raw, ds)  # Rescale Slope/Intercept or Modality LUT
        unit = _window(values, ds)
    except parse_errors:
        raise UndecodableImage("DICOM LUT attributes are invalid") from None
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit  # DICOM PS3.3 C.7.6.3.1.2: MONOCHROME1 inverts after VOI
    pixels = np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)

    return DecodedImage(
        pixels=np.ascontiguousarray(pixels),
        format="dicom",
        original_size=(cols, rows),
        channels=1,
        chroma=0.0,
        byte_size=len(data),
        modality=modality,
        body_part=str(body_part).strip() if body_part else None,
        photometric=photometric,
        pixel_spacing_mm=spacing_mm,
        bits_stored=bits_stored,
        frames=frames,
        frame_index=0,
        transfer_syntax=ts_name,
        reduced_factor=factor,
        dicom_source=source,
    )


# --------------------------------------------------------------------------- entry point

# DecodeConfig is frozen (pydantic), so one shared default instance is safe.
_DEFAULT_DECODE_CONFIG = DecodeConfig()
_DECODERS = {"png": _decode_png, "jpeg": _decode_jpeg, "dicom": _decode_dicom}


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
    target = _resolve_target(cfg, target_side)
    fmt = sniff_format(data)
    return _DECODERS[fmt](bytes(data), cfg, target)
