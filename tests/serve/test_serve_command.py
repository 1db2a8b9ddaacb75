"""`orthovision serve` as an operator runs it, with API keys on: it must start, answer
with a key, refuse without one, and stop cleanly on SIGINT."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import yaml
from support.checkpoints import TINY_BACKBONES, save_tiny_checkpoint
from support.liveapp import free_port

from orthovision.paths import PROJECT_ROOT

pytestmark = pytest.mark.serve
ROOT = PROJECT_ROOT


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def listening_addresses(pid: int) -> set[tuple[str, str]]:
    """(ip, port) of every listening TCP socket of the process and its descendants."""
    root = psutil.Process(pid)
    found = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found |= {(c.laddr.ip, str(c.laddr.port)) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def c_echo(calling_ae: str, port: int) -> int | None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ORTHOVISION")
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return status.Status


def test_serve_command_starts_with_auth_on(tmp_path):
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt")
    doc = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    config = doc["applications"][0]["args"]["config"]
    port, metrics_port = free_port(), free_port()
    config["model"]["backbones"] = [dict(b) for b in TINY_BACKBONES]
    config["serve"].update(
        port=port,
        metrics_export_port=metrics_port,
        checkpoint=str(ckpt),
        store_url=f"sqlite:///{tmp_path / 'store' / 'db'}",
    )
    config["serve"].setdefault("security", {})["auth"] = "api-key"
    # The DICOM node starts beside the service when the config enables it.
    node_port, node_metrics = free_port(), free_port()
    config["serve"]["dicom_node"].update(
        enabled=True,
        port=node_port,
        metrics_port=node_metrics,
        peers=[{"ae_title": "TESTPACS", "tenant": "clinic"}],
        queue_path=str(tmp_path / "node" / "queue.sqlite3"),
    )
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    keys = "clinic=serve-test-key"
    env = {**os.environ, "ORTHOVISION_API_KEYS": keys, "ORTHOVISION_NODE_API_KEYS": keys}
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve.commands", "serve", "--config", str(path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            lines.append(line)
            if "DICOM node" in line:
                break
        assert any("is ready at" in line for line in lines), "".join(lines)[-3000:]
        assert f"127.0.0.1:{node_port}" in lines[-1], "".join(lines)[-3000:]
        # A start within the ready timeout is not reported as slow (serve/run.py).
        assert not any("to be scheduled" in line for line in lines), "".join(lines)[-3000:]
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/model", timeout=10).status_code == 401
        r = httpx.get(f"{url}/v1/model", headers={"X-API-Key": "serve-test-key"}, timeout=10)
        assert r.status_code == 200 and r.json()["classes"]
        # The configured metrics port answers (README: curl 127.0.0.1:8080/metrics).
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        assert metrics.status_code == 200 and "ray_" in metrics.text
        # On loopback, nothing of the service tree (Ray's GCS, raylet, agents, workers,
        # the proxy) listens on another interface.
        listening = listening_addresses(proc.pid)
        ports = {p for _ip, p in listening}
        assert {str(port), str(node_port), str(node_metrics)} <= ports and len(listening) >= 5
        assert [a for a in listening if not is_loopback(a[0])] == [], listening
        assert c_echo("TESTPACS", node_port) == 0x0000  # the node answers its peer
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, (out or "")[-3000:]
