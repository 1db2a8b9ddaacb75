"""A real PACS for the DICOM node's tests: Debian's Orthanc on loopback, its own folder.

Orthanc is started with a temporary configuration (HTTP and DICOM ports on 127.0.0.1, no
plugins, no remote access) and driven through its REST API.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from support.liveapp import free_port

ORTHANC_AET = "ORTHANC"


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc")


@dataclass
class Orthanc:
    folder: Path
    modalities: dict[str, list]  # name -> [AE title, host, port]
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 30.0) -> Orthanc:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "orthovision-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": self.modalities,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "StableAge": 1,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [orthanc_binary(), str(path)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not start; see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    # ---- REST --------------------------------------------------------------------------
    def upload(self, data: bytes) -> str:
        r = httpx.post(f"{self.url}/instances", content=data, timeout=30)
        r.raise_for_status()
        return r.json()["ID"]

    def push(self, modality: str, resources: list[str]) -> httpx.Response:
        """Orthanc sends the resources to a modality by C-STORE (its own SCU)."""
        body = {"Resources": resources, "Synchronous": True}
        return httpx.post(f"{self.url}/modalities/{modality}/store", json=body, timeout=120)

    def instances_of_modality(self, modality: str) -> list[bytes]:
        """Every stored instance whose series has `modality`, as Part 10 bytes."""
        query = {"Level": "Instance", "Query": {"Modality": modality}}
        ids = httpx.post(f"{self.url}/tools/find", json=query, timeout=30).json()
        return [httpx.get(f"{self.url}/instances/{i}/file", timeout=30).content for i in ids]
