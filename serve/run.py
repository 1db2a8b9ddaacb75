"""`orthovision serve`: a local Ray, the app from a Serve config file, clean stop on Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from ray import serve

from orthovision.client.readiness import wait_http_ok
from orthovision.config import OrthoVisionConfig
from orthovision.model.card import read_card
from serve.app import AppArgs, build_app
from serve.auth import is_loopback
from serve.manifests.serve_config import load_serve_file
from serve.runtime import checkpoint_path
from serve.shedding import proxy_environment

if TYPE_CHECKING:
    from serve.dicom_node.node import DicomNode

log = logging.getLogger("orthovision.serve")
READY_TIMEOUT_S = 120.0


def wait_ready(url: str, timeout_s: float) -> bool:
    """True once the service at base `url` reports ready (GET /readyz answers 200)."""
    return wait_http_ok(url + "/readyz", timeout_s)


def start(config_file: Path, num_cpus: int | None = None) -> str:
    """Start Ray and the application; return the base URL."""
    cfg = load_serve_file(config_file)
    # Replicas on a small box take longer than Serve's 30 s to import torch and load their
    # model; below the ready timeout that is a normal start, not a warning. (Read by the
    # Serve controller, which inherits this environment in local mode.)
    os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_S", str(int(READY_TIMEOUT_S)))
    # Ray prestarts one idle task worker per CPU for the first driver; Serve runs only
    # actors, which get workers of their own, so on a small box those idle workers just
    # compete with the replicas' start (python -m bench.startup measures it).
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # The proxy sheds overload itself (serve/shedding.py); it inherits this environment too.
    s = cfg.serve
    os.environ.update(proxy_environment(s.proxy_max_inflight, s.security.header))
    # A service on loopback keeps Ray there too (serve/loopback.py, set before Ray is
    # imported); a caller that imported Ray first gets a warning, not a silent bind.
    if is_loopback(s.host) and ray.util.get_node_ip_address() != "127.0.0.1":
        log.warning("Ray listens beyond loopback: start it through `orthovision serve`")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        configure_logging=False,
        ignore_reinit_error=True,
        _metrics_export_port=cfg.serve.metrics_export_port,
    )
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(
        build_app(AppArgs(config=cfg)), name=cfg.serve.app_name, route_prefix="/", blocking=False
    )
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def start_dicom_node(cfg: OrthoVisionConfig) -> DicomNode | None:
    """The DICOM node beside the local service, when the config enables it."""
    if not cfg.serve.dicom_node.enabled:
        return None
    from serve.dicom_node.run import build_node

    node = build_node(cfg)
    node.start()
    return node


def run(config_file: Path, ready_timeout_s: float = READY_TIMEOUT_S) -> int:
    url = start(config_file)
    out = sys.stdout
    if not wait_ready(url, ready_timeout_s):
        out.write(f"service did not become ready within {ready_timeout_s:.0f} s\n")
        serve.shutdown()
        ray.shutdown()
        return 1
    cfg = load_serve_file(config_file)
    # The card from the checkpoint itself: over HTTP it would need an API key when auth is on.
    card = read_card(checkpoint_path(cfg))
    if not card.get("trained"):
        out.write(
            "\n" + "!" * 78 + "\nWARNING: the checkpoint has RANDOM, UNTRAINED weights. "
            "Outputs mean nothing;\nevery class is unvalidated, so every result abstains.\n"
            + "!" * 78
            + "\n"
        )
    out.write(f"\nOrthoVision Serve is ready at {url}  (API docs: {url}/docs). Ctrl-C stops it.\n")
    node = start_dicom_node(cfg)
    if node is not None:
        n = node.cfg
        out.write(f"DICOM node {n.ae_title} listens on {n.host}:{node.port} (C-STORE in).\n")
    out.flush()
    # Own handlers: Ray's driver may replace Python's default SIGINT handler.
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
        out.write("stopping...\n")
    finally:
        if node is not None:
            node.stop()
        serve.shutdown()
        ray.shutdown()
    out.write("stopped.\n")
    return 0
