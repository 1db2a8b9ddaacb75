"""Coverage-guided fuzzing of the decoder with atheris (libFuzzer).

Any exception other than an InputError subclass is a crash; libFuzzer's -timeout flags a
hang. Memory: the process caps its own address space, and after every input checks its own
peak RSS (VmHWM). libFuzzer's -rss_limit_mb is NOT used: it reads getrusage's ru_maxrss,
which Linux carries across fork + exec, so a fuzzer started from a large process (a pytest
run holding torch and a Ray app) starts "over the limit" and fails on its first inputs
while the same run passes from a small parent (the CI flake of issue 16).

    python tests/orthovision/imaging/fuzz/fuzz_decoder.py \
        -runs=100000 -timeout=2 -rss_limit_mb=0 CORPUS_DIR
(`make fuzz` does this with a seed corpus made by tests/orthovision/imaging/fuzz/seeds.py.)
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
    from orthovision.imaging.decode import decode_radiograph

CFG = DecodeConfig(max_bytes=1 << 20, max_pixels=4_000_000, max_side_px=8_000)
PEAK_RSS_LIMIT_KB = 1024 * 1024


def peak_rss_kb() -> int:
    """This process's own peak resident set (VmHWM), unlike ru_maxrss never the parent's."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def test_one_input(data: bytes) -> None:
    try:
        decode_radiograph(data, CFG)
    except InputError:
        pass  # a clear client error is the expected outcome for garbage
    peak = peak_rss_kb()
    if peak > PEAK_RSS_LIMIT_KB:
        raise MemoryError(f"decoding this input raised peak RSS to {peak >> 10} MiB")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
