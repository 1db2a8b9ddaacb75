"""int8 graphs for small clinics (`serve.cpu_backend: onnx-int8`).

Static quantisation by ONNX Runtime: QDQ format, per-channel int8 weights, uint8 activations
calibrated (min/max) on training-split images, never validation or test ones. The graphs
are made offline by `python -m bench.int8` into the checkpoint folder (`int8/`), beside a
manifest naming the weights they came from; a replica refuses graphs of other weights. A
branch keeps its graph only if its top-1 agrees with fp32 on the validation split, and the
same command then reports the test-split fracture AUC and the service's label agreement
against fp32 (docs/PERFORMANCE.md).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

INT8_DIR = "int8"
MANIFEST = "manifest.json"


def int8_graph(checkpoint: Path, branch: str, weights_sha256: str) -> Path | None:
    """The branch's int8 graph in `checkpoint`, if one was made from these weights."""
    folder = Path(checkpoint) / INT8_DIR
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    path = folder / f"{branch}.onnx"
    if manifest.get("weights_sha256") != weights_sha256 or not path.is_file():
        return None
    return path


def quantize_graph(fp32: Path, out: Path, calibration: Iterable[np.ndarray]) -> Path:
    """Quantise the fp32 graph at `fp32` (input "input": float32 (B, 3, S, S)) to `out`,
    calibrating activations on `calibration`, an iterable of such input batches."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self, batches: Iterator[np.ndarray]) -> None:
            self.batches = batches

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {"input": np.ascontiguousarray(batch, np.float32)}

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        # Shape inference and graph folding first, as ORT recommends before quantising.
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared))
        staged = Path(tmp) / out.name
        quantize_static(
            str(prepared),
            str(staged),
            Reader(iter(calibration)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # 7-bit weights: u8 x s8 products then cannot saturate the int16 sums of AVX2
            # CPUs without VNNI (the dev box), and the graph stays portable between CPUs.
            reduce_range=True,
        )
        os.replace(staged, out)
    return out


def write_manifest(checkpoint: Path, weights_sha256: str, calibration: dict) -> Path:
    path = Path(checkpoint) / INT8_DIR / MANIFEST
    path.write_text(
        json.dumps({"weights_sha256": weights_sha256, "calibration": calibration}, indent=1) + "\n"
    )
    return path
