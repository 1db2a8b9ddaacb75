"""Synthetic inputs built by code: radiograph-like arrays, PNG/JPEG/DICOM bytes and
malformed variants."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from support.data import FAKE_PATIENT_ID, FAKE_PATIENT_NAME


def gradient(height: int = 256, width: int = 320, dtype: type = np.uint8) -> np.ndarray:
    """A smooth 2-D ramp with some structure: not constant, compresses well."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    v = 0.5 + 0.25 * np.sin(x / 17.0) + 0.25 * np.cos(y / 23.0)
    top = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1.0
    return np.clip(v * top, 0, top).astype(dtype)


def radiograph(seed: int = 0, h: int = 320, w: int = 256) -> np.ndarray:
    """A synthetic radiograph-like image: dark background, a bright 'bone', noise."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 35.0)
    img[h // 6 : 5 * h // 6, w // 3 : 2 * w // 3] = 175 + seed
    return (img + rng.normal(0, 10, img.shape)).clip(0, 255).astype(np.uint8)


def colour_photo(height: int = 256, width: int = 320) -> np.ndarray:
    """Saturated RGB stripes: a colour photo, not a radiograph."""
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[..., 0] = 230
    rgb[:, : width // 2, 1] = 200
    rgb[height // 2 :, :, 2] = 180
    rgb[::3, :, 0] = 20
    return rgb


def make_png(array: np.ndarray | Image.Image, mode: str | None = None, **save_kw) -> bytes:
    """Encode with Pillow. uint16 arrays become 16-bit grey PNGs."""
    img = array if isinstance(array, Image.Image) else Image.fromarray(array)
    if mode is not None and img.mode != mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save_kw)
    return buf.getvalue()


def make_jpeg(
    array: np.ndarray | Image.Image,
    mode: str | None = None,
    quality: int = 90,
    exif_orientation: int | None = None,
    **save_kw,
) -> bytes:
    img = array if isinstance(array, Image.Image) else Image.fromarray(array)
    if mode is not None and img.mode != mode:
        img = img.convert(mode)
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        save_kw["exif"] = exif.tobytes()
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **save_kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes, crc: int | None = None) -> bytes:
    crc = zlib.crc32(kind + payload) if crc is None else crc
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def make_png_header_only(
    width: int, height: int, bit_depth: int = 8, colour_type: int = 0
) -> bytes:
    """A PNG that declares `width` x `height` but carries a tiny IDAT: a decompression bomb
    stand-in that is a few dozen bytes on disk."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _png_chunk(b"IEND", b"")
    )


def corrupt_png_crc(png: bytes) -> bytes:
    """Flip the CRC of the first IDAT chunk."""
    at = png.index(b"IDAT")
    length = struct.unpack(">I", png[at - 4 : at])[0]
    crc_at = at + 4 + length
    bad = bytes(b ^ 0xFF for b in png[crc_at : crc_at + 4])
    return png[:crc_at] + bad + png[crc_at + 4 :]


def make_apng(frames: int = 2, size: tuple[int, int] = (64, 48)) -> bytes:
    imgs = [Image.fromarray(gradient(size[1], size[0]) // (i + 1)) for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, format="PNG", save_all=True, append_images=imgs[1:], duration=100)
    return buf.getvalue()


def make_other_format(fmt: str, size: tuple[int, int] = (32, 24)) -> bytes:
    """GIF, TIFF, BMP, WEBP ... via Pillow (formats we refuse)."""
    buf = io.BytesIO()
    Image.fromarray(gradient(size[1], size[0])).save(buf, format=fmt)
    return buf.getvalue()


def make_dicom(
    modality: str | None = "CR",
    photometric: str = "MONOCHROME2",
    pixels: np.ndarray | None = None,
    *,
    with_pixels: bool = True,
    bits_stored: int | None = None,
    preamble: bool = True,
    transfer_syntax: str | None = None,
    **elements: object,
) -> bytes:
    """A small Part 10 file, uncompressed Explicit VR Little Endian by default.

    `pixels` is (rows, cols) or (frames, rows, cols) uint8/uint16/int16 stored values.
    Extra keyword arguments become dataset elements by keyword (WindowCenter=..., ...).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    if pixels is None:
        pixels = gradient(64, 80, np.uint16) >> 4  # 12-bit values
    ds = Dataset()
    ds.PatientName = FAKE_PATIENT_NAME
    ds.PatientID = FAKE_PATIENT_ID
    ds.AccessionNumber = "ACC-SECRET-9"
    ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.1")  # CR Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if modality is not None:
        ds.Modality = modality
    ds.BodyPartExamined = "HAND"
    ds.ImagerPixelSpacing = [0.15, 0.15]
    if with_pixels:
        frames = pixels.shape[0] if pixels.ndim == 3 else 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.BitsAllocated = pixels.dtype.itemsize * 8
        ds.BitsStored = bits_stored or (12 if pixels.dtype.itemsize == 2 else 8)
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if np.issubdtype(pixels.dtype, np.signedinteger) else 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax or ExplicitVRLittleEndian)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return data if preamble else data[132:]


def set_photometric(data: bytes, photometric: str) -> bytes:
    """Rewrite PhotometricInterpretation of an existing file, pixel data untouched."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PhotometricInterpretation = photometric
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
