"""Patient pseudonyms, and DICOM patient attributes sealed at rest (docs/STUDIES.md).

A patient reference is HMAC-SHA256 over (IssuerOfPatientID, PatientID) under a per-tenant
secret: stable within a tenant, unlinkable across tenants, not reversible without the
secret. The store keeps references only. The source attributes a DICOM SR/SC must copy
(PatientName, PatientID, ...) are sealed with AES-GCM under a key derived from the same
secret inside the private record, so no store file or key holds an identifier, and erasing
a patient's records erases the only copies. The secrets come from the environment
(`security.patient_keys_env`, a Kubernetes Secret), never from config files.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from orthovision.config import SecurityConfig
from orthovision.errors import InputError
from orthovision.imaging.dicom import DICOM_SOURCE_UIDS
from serve.auth import LOCAL_TENANT

log = logging.getLogger("ray.serve")

# The only built-in secret: for the auth-off local tenant, which exists on loopback only
# (serve/auth.py check_binding). Every API-key tenant needs its own secret from the env.
LOCAL_PATIENT_SECRET = "orthovision-local-tenant-patient-key"
MIN_SECRET_CHARS = 16
PATIENT_REF = re.compile(r"[0-9a-f]{64}")
# DICOM LO: the longest PatientID / IssuerOfPatientID a client may send in a header.
MAX_ID_CHARS = 64
SEALED_KEY = "dicom_sealed"  # the private record's sealed attributes (base64 nonce+ct)


def parse_patient_keys(value: str | None) -> dict[str, str]:
    """`{"tenant": "secret", ...}` -> dict; errors never quote a secret."""
    if not value:
        return {}
    try:
        keys = json.loads(value)
    except ValueError:
        raise ValueError("patient keys must be a JSON object {tenant: secret}") from None
    if not isinstance(keys, dict) or not all(
        isinstance(t, str) and isinstance(s, str) for t, s in keys.items()
    ):
        raise ValueError("patient keys must be a JSON object {tenant: secret}")
    short = sorted(t for t, s in keys.items() if len(s) < MIN_SECRET_CHARS)
    if short:
        raise ValueError(f"patient key of tenant(s) {short} is under {MIN_SECRET_CHARS} chars")
    return keys


class BadPatientHeader(InputError):
    code = "bad_patient_header"


def header_id(value: str | None, name: str, required: bool) -> str | None:
    """A patient id header's value, checked (the message never quotes the value)."""
    value = (value or "").strip()
    if not value:
        if required:
            raise BadPatientHeader(f"header {name} is required")
        return None
    if len(value) > MAX_ID_CHARS or not value.isprintable():
        raise BadPatientHeader(f"{name} must be at most {MAX_ID_CHARS} printable characters")
    return value


def _derive(secret: str, purpose: bytes) -> bytes:
    """One key per purpose from a tenant's secret: the references never share a key with
    the sealing."""
    return hmac.new(secret.encode(), b"orthovision/" + purpose, hashlib.sha256).digest()


class PatientKeys:
    """Per-tenant patient references and sealing. A tenant without a secret gets no
    references (no timeline) and its DICOM patient attributes are not kept at all."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self._ref = {t: _derive(s, b"patient-ref/v1") for t, s in secrets.items()}
        self._seal = {t: AESGCM(_derive(s, b"seal/v1")) for t, s in secrets.items()}

    @classmethod
    def from_env(cls, security: SecurityConfig, tenants: list[str]) -> PatientKeys:
        secrets = parse_patient_keys(os.environ.get(security.patient_keys_env))
        if security.auth == "none":
            secrets.setdefault(LOCAL_TENANT, LOCAL_PATIENT_SECRET)
        missing = sorted(set(tenants) - set(secrets))
        if missing:
            log.warning(
                "no patient key for tenant(s) %s (%s): no patient timeline, and their DICOM "
                "SR/SC carry no patient attributes",
                missing,
                security.patient_keys_env,
            )
        return cls(secrets)

    def enabled(self, tenant: str) -> bool:
        return tenant in self._ref

    def ref(self, tenant: str, patient_id: str | None, issuer: str | None = None) -> str | None:
        """The tenant's reference of a patient; None without an id or a tenant secret."""
        key = self._ref.get(tenant)
        pid = (patient_id or "").strip()
        if key is None or not pid:
            return None
        # A JSON pair: no separator an issuer could contain makes two patients collide.
        message = json.dumps([(issuer or "").strip(), pid]).encode()
        return hmac.new(key, message, hashlib.sha256).hexdigest()

    def seal(self, tenant: str, private: dict) -> dict:
        """The private record part as stored: the DICOM source cut to its UIDs, the other
        attributes sealed (or dropped when the tenant has no secret)."""
        source = private.get("dicom_source")
        if not source:
            return private
        uids = {k: source[k] for k in DICOM_SOURCE_UIDS if k in source}
        rest = {k: v for k, v in source.items() if k not in uids}
        out = {**private, "dicom_source": uids}
        aead = self._seal.get(tenant)
        if rest and aead is not None:
            nonce = os.urandom(12)
            sealed = aead.encrypt(nonce, json.dumps(rest).encode(), tenant.encode())
            out[SEALED_KEY] = base64.b64encode(nonce + sealed).decode("ascii")
        return out

    def open(self, tenant: str, private: dict) -> dict | None:
        """The full DICOM source of a stored private part (UIDs only if it cannot be
        opened: no secret, or a rotated one); None for a non-DICOM input."""
        source = private.get("dicom_source")
        if not source:
            return None
        token, aead = private.get(SEALED_KEY), self._seal.get(tenant)
        if not token or aead is None:
            return dict(source)
        blob = base64.b64decode(token)
        try:
            rest = json.loads(aead.decrypt(blob[:12], blob[12:], tenant.encode()))
        except InvalidTag:
            log.warning("sealed DICOM attributes cannot be opened (patient key rotated?)")
            return dict(source)
        return {**rest, **source}
