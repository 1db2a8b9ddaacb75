"""Write the fuzzing seed corpus: valid PNG/JPEG/DICOM files plus the hostile corpus."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

TESTS = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(TESTS))  # tests/support: the builders and the hostile corpus

from support.hostile import (  # noqa: E402
    body_cases,
    deflated_dicom_bomb,
    deflated_dicom_small,
    j2k_codestream_bomb,
    jpeg_codestream_bomb,
    jpegls_codestream_bomb,
)
from support.images import gradient, make_dicom, make_jpeg, make_png  # noqa: E402


def seeds() -> list[bytes]:
    small = gradient(48, 40)
    out = [
        make_png(small),
        make_png(gradient(48, 40, np.uint16)),
        make_jpeg(small),
        make_jpeg(small, exif_orientation=6),
        make_dicom(pixels=gradient(32, 32, np.uint16) >> 4),
        make_dicom(
            photometric="MONOCHROME1",
            pixels=gradient(32, 32, np.uint16) >> 4,
            WindowCenter=2000,
            WindowWidth=1000,
        ),
        make_dicom(pixels=np.stack([gradient(16, 16, np.uint16) >> 4] * 3)),
    ]
    out += [c.body for c in body_cases() if 0 < len(c.body) <= 200_000]
    # The bomb classes (small on the wire): the fuzzer mutates around each bound.
    out += [
        deflated_dicom_small(),
        deflated_dicom_bomb(8),
        j2k_codestream_bomb(40_000, 32),
        jpeg_codestream_bomb(16_000, 32),
        jpegls_codestream_bomb(16_000, 32),
    ]
    return out


def write(directory: Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    items = seeds()
    for data in items:
        (directory / hashlib.sha1(data).hexdigest()).write_bytes(data)
    return len(items)


if __name__ == "__main__":
    n = write(Path(sys.argv[1]))
    sys.stdout.write(f"wrote {n} seeds to {sys.argv[1]}\n")
