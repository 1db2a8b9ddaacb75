"""Coverage-guided fuzzing of the decoder with atheris (libFuzzer).

Any exception other than an InputError subclass is a crash; libFuzzer's -timeout flags a
hang and -rss_limit_mb a memory blow-up. The process also caps its own address space.

    python tests/fuzz/fuzz_decoder.py -runs=100000 -timeout=2 -rss_limit_mb=1024 CORPUS_DIR
(`make fuzz` does this with a seed corpus made by tests/fuzz/seeds.py.)
"""

from __future__ import annotations

import resource
import sys

import atheris

# 1 GiB address-space cap: a decompression bomb that slipped past the bounds dies here.
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

with atheris.instrument_imports(include=["orthovision", "pydicom"]):
    from orthovision.config import DecodeConfig
    from orthovision.errors import InputError
    from orthovision.io import decode_radiograph

CFG = DecodeConfig(max_bytes=1 << 20, max_pixels=4_000_000, max_side_px=8_000)


def test_one_input(data: bytes) -> None:
    try:
        decode_radiograph(data, CFG)
    except InputError:
        pass  # a clear client error is the expected outcome for garbage


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
