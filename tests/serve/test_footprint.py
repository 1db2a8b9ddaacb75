"""Only the Explainer (and a backbone serving torch) carries torch: the ingress,
Preprocessor and Fusion run on numpy and OpenCV, and a CPU backbone on ONNX Runtime, so the
service is small (issue 19: importing torch costs ~0.7 GiB per process). The control that
the check can see torch is the subprocess test below."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psutil
import pytest

# The CPU-side deployments, and the driver that builds the application (`orthovision
# serve`): it imports every deployment module, so the model replicas import torch lazily.
CPU_SIDE = ("serve.ingress", "serve.preprocessor", "serve.fusion", "serve.commands", "serve.app")
ROOT = Path(__file__).resolve().parents[2]


def imports_torch(module: str) -> bool:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "True"


@pytest.mark.parametrize("module", CPU_SIDE)
def test_cpu_side_deployment_modules_never_import_torch(module):
    assert not imports_torch(module)


def test_the_check_sees_torch_where_it_is():
    assert imports_torch("orthovision.model.torch_engine")


def replica_processes(deployment: str) -> list[psutil.Process]:
    """Ray names each replica's worker process `ray::ServeReplica:<app>:<deployment>`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if f"ServeReplica:orthovision:{deployment}" in cmdline:
            found.append(proc)
    return found


def maps_torch(proc: psutil.Process) -> bool:
    return "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()


@pytest.mark.serve
def test_live_classifying_replicas_map_no_torch(live_app):
    """Only the Explainer loads torch (and it is scaled to zero while idle)."""
    for deployment in ("Ingress", "Preprocessor", "Fusion", "Backbone_"):
        procs = replica_processes(deployment)
        assert procs, f"no {deployment} replica process found"
        assert not any(maps_torch(p) for p in procs), deployment
