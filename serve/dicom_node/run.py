"""Building and running the DICOM node from a Serve config file (`orthovision dicom-node`,
and `orthovision serve` when `dicom_node.enabled`)."""

from __future__ import annotations

import os
import signal
import sys
import threading

from orthovision.config import OrthoVisionConfig
from serve.auth import is_loopback, key_pairs
from serve.dicom_node.forward import ServiceClient
from serve.dicom_node.node import DicomNode


def service_url(cfg: OrthoVisionConfig) -> str:
    node = cfg.serve.dicom_node
    return node.service_url or f"http://{cfg.serve.host}:{cfg.serve.port}"


def build_node(cfg: OrthoVisionConfig) -> DicomNode:
    """The node of `cfg`, its service client keyed from `dicom_node.api_keys_env`."""
    node = cfg.serve.dicom_node
    if cfg.serve.security.auth == "none" and not is_loopback(node.host):
        raise RuntimeError(
            f"refusing to start: the service has no authentication and the DICOM node would "
            f"listen on {node.host}; keep it on loopback or turn api-key auth on"
        )
    keys = key_pairs(os.environ.get(node.api_keys_env))
    client = ServiceClient(service_url(cfg), keys, cfg.serve.security.header)
    return DicomNode(node, client, cfg.decode.max_bytes, sc_wait_s=cfg.serve.explanation_timeout_s)


def run_node(cfg: OrthoVisionConfig, port: int | None = None) -> int:
    """Run the node alone until SIGINT/SIGTERM (its Kubernetes pod's command)."""
    node = cfg.serve.dicom_node
    if port is not None:
        node = node.model_copy(update={"port": port})
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"dicom_node": node})})
    dicom = build_node(cfg)
    dicom.start()
    sys.stdout.write(f"DICOM node {node.ae_title} on {node.host}:{dicom.port}. Ctrl-C stops it.\n")
    if not node.peers:
        sys.stdout.write("No peers configured: every association is rejected (dicom_node.peers).\n")
    sys.stdout.flush()
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    dicom.stop()
    return 0
