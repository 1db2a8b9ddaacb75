"""`orthovision predict`: one result per file, exit 2 with a one-line reason for any bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.data import SHARED, requires_shared
from support.images import (
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
from support.pdf import pdf_text

from orthovision.cli import main
from orthovision.config import ModelConfig, OrthoVisionConfig
from orthovision.model.backbones import build_ensemble
from orthovision.model.checkpoint import save_checkpoint
from orthovision.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    cfg = OrthoVisionConfig(
        model=ModelConfig(
            backbones=(
                {"name": "efficientnet_b0", "timm_name": "test_efficientnet"},
                {"name": "resnet18", "timm_name": "test_resnet"},
            )
        )
    )
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(
        build_ensemble(cfg.model),
        cfg,
        out,
        validated_classes=["fracture", "non-affected"],
        trained=False,
    )
    return out


BAD_INPUTS = {
    "empty.png": lambda: b"",
    "truncated.png": lambda: make_png(radiograph())[:300],
    "truncated.jpg": lambda: make_jpeg(radiograph())[:400],
    "bad-crc.png": lambda: corrupt_png_crc(make_png(radiograph())),
    "one-pixel.png": lambda: make_png(np.full((1, 1), 128, np.uint8)),
    "1x20000.png": lambda: make_png(gradient(20000, 1)),
    "bomb-50k.png": lambda: make_png_header_only(50_000, 50_000),
    "zip-named.png": lambda: b"PK\x03\x04" + b"\x14\x00" * 200,
    "html-named.png": lambda: b"<!DOCTYPE html><html><body>not an image</body></html>",
    "animated.png": lambda: make_apng(),
    "image.gif": lambda: make_other_format("GIF"),
    "image.tif": lambda: make_other_format("TIFF"),
    "colour-photo.jpg": lambda: make_jpeg(colour_photo()),
    "no-pixels.dcm": lambda: make_dicom(with_pixels=False),
    "ct.dcm": lambda: make_dicom(modality="CT", pixels=radiograph().astype(np.uint16)),
    "no-preamble.dcm": lambda: make_dicom(preamble=False),
}


def run_predict(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["predict", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_exit_2_one_line_reason(tmp_path, capsys, tiny_checkpoint, name):
    path = tmp_path / name
    path.write_bytes(BAD_INPUTS[name]())
    code, out, err = run_predict(capsys, str(path), "--checkpoint", str(tiny_checkpoint))
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith(str(path))]
    assert len(lines) == 1 and "rejected" in lines[0]
    assert "Traceback" not in err + out


@requires_shared
def test_shared_bad_inputs_exit_2(capsys, tiny_checkpoint):
    files = sorted(p for p in (SHARED / "bad-inputs").rglob("*") if p.suffix in {".jpg", ".dcm"})
    assert len(files) == 6
    code, out, err = run_predict(capsys, *map(str, files), "--checkpoint", str(tiny_checkpoint))
    assert code == 2
    for f in files:
        assert sum(line.startswith(str(f)) for line in err.splitlines()) == 1
    assert "pixel data cannot be decoded" in err
    assert "Traceback" not in err


def test_good_and_bad_mixed_json(tmp_path, capsys, tiny_checkpoint):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(make_png(radiograph()))
    bad.write_bytes(b"GIF89a" + b"\0" * 20)
    code, out, _ = run_predict(
        capsys, str(good), str(bad), "--json", "--checkpoint", str(tiny_checkpoint)
    )
    assert code == 2
    first, second = (json.loads(line) for line in out.splitlines())
    assert abs(sum(first["probabilities"].values()) - 1) < 1e-5
    assert second["error"]["code"] == "unsupported_format"


def test_explain_writes_overlay(tmp_path, capsys, tiny_checkpoint):
    image = tmp_path / "wrist.png"
    image.write_bytes(make_png(radiograph()))
    code, out, _ = run_predict(
        capsys,
        str(image),
        "--json",
        "--explain",
        str(tmp_path / "x"),
        "--checkpoint",
        str(tiny_checkpoint),
    )
    assert code == 0
    overlay = tmp_path / "x" / "wrist.gradcampp.png"
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(out)["explanation_url"].endswith("wrist.gradcampp.png")


@requires_shared
def test_predict_rg3_with_default_checkpoint_subprocess():
    """The issue's acceptance command, as a user runs it, with the shipped checkpoint."""
    import pydicom

    path = SHARED / "dicom" / "RG3_J2KR.dcm"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "orthovision.cli", "predict", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["probabilities"]) == 4
    assert abs(sum(result["probabilities"].values()) - 1) < 1e-5
    assert result["input"]["modality"] == "CR" and result["input"]["body_part"]
    assert "findings" in result["quality"]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for value in (str(ds.PatientName), str(ds.PatientID)):
        assert value and value not in proc.stdout + proc.stderr


@requires_shared
def test_undecodable_dicom_prints_one_line_and_no_library_traceback(tiny_checkpoint):
    """In a real process (pytest's log capture would hide pydicom's records otherwise)."""
    import subprocess
    import sys

    bad = SHARED / "bad-inputs" / "malformed-dicom" / "RG2_JPLY.dcm"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "orthovision.cli",
            "predict",
            str(bad),
            "--checkpoint",
            str(tiny_checkpoint),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "UNTRAINED" not in ln]
    assert lines == [f"{bad}: rejected (undecodable): DICOM pixel data cannot be decoded"], lines


@requires_shared
def test_shipped_model_abstains_on_the_chest_film_and_the_phantom():
    """Out of scope by header (chest CR) or out of distribution by the features (DX phantom),
    with the shipped checkpoint, as a user runs it."""
    files = [SHARED / "dicom" / n for n in ("RG1_J2KI.dcm", "JPEG2KLossless_1s_1f_u_16_16.dcm")]
    proc = subprocess.run(
        [sys.executable, "-m", "orthovision.cli", "predict", *map(str, files), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    codes = [r["abstain_code"] for r in results]
    assert all(r["abstained"] and r["label"] is None for r in results)
    assert codes == ["out_of_scope", "out_of_distribution"], codes


@pytest.mark.skipif(not shutil.which("pdftotext"), reason="poppler-utils not installed")
def test_report_puts_the_heat_map_on_the_source_image(tiny_checkpoint, tmp_path):
    path = tmp_path / "tall.png"
    path.write_bytes(make_png(radiograph(h=300, w=150)))
    out = tmp_path / "r.pdf"
    assert main(["report", str(path), "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    text = " ".join(pdf_text(out.read_bytes()).split())
    assert "Heat map on the source image (150x300 px" in text
