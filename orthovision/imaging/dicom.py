"""DICOM Part 10 decoding: capped deflate inflation, codestream geometry checked against
the header, windowing, reduced JPEG 2000 decodes and the source attributes the clinical
outputs reference (never patient identifiers).

Over 400 lines on purpose: every check here guards the one decode below it, in the order
the decode needs them; split apart, a reader could no longer see that each allocation has
its bound.
"""

from __future__ import annotations

import io
import logging
import math
import struct
import warnings
import zlib

import numpy as np
import pydicom.config  # noqa: F401  (first: the logging lines below must run before use)
from PIL import Image

from orthovision.config import DecodeConfig
from orthovision.errors import (
    InputTooLarge,
    NotARadiograph,
    UndecodableImage,
)
from orthovision.imaging.pixels import (
    DecodedImage,
    check_decoded_bytes,
    check_pixel_bounds,
    downscale,
    integer_factor,
)

# pydicom logs and warns with header values (patient identifiers among them): silenced.
logging.getLogger("pydicom").disabled = True
logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")

DICOM_PREAMBLE_BYTES = 128  # DICOM PS3.10 7.1: 128-byte preamble, then "DICM"
J2K_SOC_SIZ = b"\xff\x4f\xff\x51"  # JPEG 2000 codestream: SOC then SIZ marker

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
    "BodyPartExamined": 16,  # carried to the SC (and read by the scope check)
    "ViewPosition": 16,  # the view of a study's instance (AP, PA, LAT...): study results
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


# Start of Frame markers of ITU-T T.81 (JPEG: all but DHT C4, JPG C8, DAC CC) and T.87
# (JPEG-LS: F7). Each segment: length(2) precision(1) Y(2) X(2) components(1).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}


def codestream_geometry(frame: bytes) -> tuple[int, int, int] | None:
    """(columns, rows, components) a compressed frame declares itself, or None when it is
    not a JPEG / JPEG-LS / JPEG 2000 codestream (RLE and others carry no geometry).

    The header's Rows/Columns bound the decode only if the codestream agrees: a decoder
    allocates what the codestream says, so a 2 KB file can declare 40000 x 40000.
    """
    if frame.startswith(J2K_SOC_SIZ):
        if len(frame) < 42:
            raise UndecodableImage("JPEG 2000 codestream is truncated")
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", frame[8:24])
        (csiz,) = struct.unpack(">H", frame[40:42])
        return xsiz - xosiz, ysiz - yosiz, csiz
    if frame.startswith(b"\x00\x00\x00\x0cjP  "):  # a JP2 file wrapped in the frame
        start = frame.find(J2K_SOC_SIZ, 0, 1 << 16)
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


def decode_dicom(data: bytes, cfg: DecodeConfig, target: int) -> DecodedImage:
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
    check_pixel_bounds(cols, rows, cfg, frames)
    sample_bytes = max(1, (bits_allocated + 7) // 8)
    # Codecs (openjpeg, libjpeg, CharLS) work in 32-bit samples, then hand back the array.
    check_decoded_bytes(cols, rows, sample_bytes + (4 if compressed else 0), cfg)
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
    extra = integer_factor(raw.shape[1], raw.shape[0], target)
    raw = downscale(raw, extra)
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
