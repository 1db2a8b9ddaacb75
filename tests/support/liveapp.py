"""One live Ray Serve app per test session (tiny timm backbones, API keys, fractional CPUs).

Every `serve`-marked test file uses the session fixture `live_app` from conftest.py, so the
suite pays for one Ray start.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from support.images import make_png, radiograph

KEY, VIEWER_KEY = "test-key-hospital-a", "test-key-viewer"
KEY_B = "test-key-hospital-b"  # a second full tenant: isolation tests
# Each tenant's patient secret (serve/patients.py); the viewer tenant has none.
PATIENT_KEYS = {"hospital-a": "patient-secret-hospital-a", "hospital-b": "patient-secret-b-0123"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_with_retry(client: httpx.Client, path: str, attempts: int = 8, **kw) -> httpx.Response:
    """POST as a well-behaved client does: back off and retry on 429/503 (admission control)."""
    for attempt in range(attempts):
        r = client.post(path, **kw)
        if r.status_code not in (429, 503):
            return r
        time.sleep(min(2.0, 0.1 * 2**attempt))
    return r


@dataclass
class LiveApp:
    url: str
    client: httpx.Client  # sends the hospital-a key by default
    metrics_port: int
    cfg: object  # OrthoVisionConfig
    tmp: Path


def add_ood_detector(ckpt_dir: Path, threshold: float) -> None:
    """Fit an OOD detector on synthetic radiographs and write it into a checkpoint's card."""
    import json

    import numpy as np

    from orthovision.evaluation.run import branch_outputs
    from orthovision.model.card import CARD_FILE
    from orthovision.model.checkpoint import load_checkpoint
    from orthovision.model.local import LocalPredictor
    from orthovision.safety.ood import OODDetector

    local = LocalPredictor(load_checkpoint(ckpt_dir))
    pixels = np.stack([local.prepare(make_png(radiograph(seed=s))).pixels for s in range(24)])
    features, _ = branch_outputs(local.model, pixels)
    detector = OODDetector.fit(features, np.arange(24) % 2)
    sha = detector.save(ckpt_dir / "ood.safetensors")
    card = json.loads((ckpt_dir / CARD_FILE).read_text())
    card["ood"] = {
        "method": "test",
        "file": "ood.safetensors",
        "sha256": sha,
        "threshold": threshold,
    }
    (ckpt_dir / CARD_FILE).write_text(json.dumps(card))


def start_live_app(tmp: Path, ready_timeout_s: float = 180) -> LiveApp:
    import ray
    import torch
    from ray import serve

    from orthovision.config import ModelConfig, OrthoVisionConfig, ServeConfig
    from orthovision.model.backbones import build_ensemble
    from orthovision.model.checkpoint import save_checkpoint
    from serve.app import AppArgs, build_app
    from serve.auth import hash_key
    from serve.shedding import proxy_environment

    model_cfg = ModelConfig(
        backbones=(
            {"name": "efficientnet_b0", "timm_name": "test_efficientnet"},
            {"name": "resnet18", "timm_name": "test_resnet"},
        )
    )
    port, metrics_port = free_port(), free_port()
    tenants = [
        {"id": "hospital-a", "key_sha256": hash_key(KEY), "rate_per_s": 1000, "burst": 1000},
        {"id": "hospital-b", "key_sha256": hash_key(KEY_B), "rate_per_s": 1000, "burst": 1000},
        {
            "id": "viewer",
            "key_sha256": hash_key(VIEWER_KEY),
            "scopes": ["read"],
            "rate_per_s": 0.2,
            "burst": 2,
        },
    ]
    cfg = OrthoVisionConfig(
        model=model_cfg,
        serve=ServeConfig(
            port=port,
            device="cpu",
            checkpoint=str(tmp / "ckpt"),
            store_url=f"sqlite:///{tmp / 'store.sqlite3'}",
            batch={"max_batch_size": 8, "batch_wait_timeout_s": 0.05},
            max_body_bytes=8 * 1024 * 1024,
            body_timeout_s=2.0,
            security={"auth": "api-key", "tenants": tenants},
        ),
    )
    torch.manual_seed(0)
    save_checkpoint(
        build_ensemble(cfg.model),
        cfg,
        tmp / "ckpt",
        validated_classes=["fracture", "non-affected"],
        trained=False,
    )
    add_ood_detector(tmp / "ckpt", threshold=1e9)  # scored end to end, never abstains
    # The local cluster's workers inherit the driver's environment (as pods get a Secret).
    os.environ[cfg.serve.security.patient_keys_env] = json.dumps(PATIENT_KEYS)
    # The proxy sheds overload as under `orthovision serve` (serve/shedding.py).
    os.environ.update(proxy_environment(cfg.serve.proxy_max_inflight, cfg.serve.security.header))
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        configure_logging=False,
    )
    # The HTTP port is picked once Ray's own processes have taken theirs: picked before,
    # one of them could grab it first (a proxy that cannot bind never becomes ready).
    port = free_port()
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"port": port})})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(config=cfg)), name="orthovision", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    client = httpx.Client(base_url=url, timeout=60, headers={"X-API-Key": KEY})
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return LiveApp(url, client, metrics_port, cfg, tmp)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_live_app(None)
    raise RuntimeError(f"app not ready in {ready_timeout_s:.0f} s")


def stop_live_app(app: LiveApp | None) -> None:
    import ray
    from ray import serve

    if app is not None:
        app.client.close()
    serve.shutdown()
    ray.shutdown()
