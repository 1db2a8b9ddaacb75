"""The real data beside the checkout (../shared), and the fake patient identifiers
that tests plant to prove none leaks."""

from __future__ import annotations

import pytest

from orthovision.paths import SHARED_DATA

SHARED = SHARED_DATA
requires_shared = pytest.mark.skipif(
    not SHARED.exists(), reason="../shared/data absent (fresh clone): real-data tests skipped"
)

# Fake identifiers planted in synthetic DICOM so tests can prove they never leak.
FAKE_PATIENT_NAME = "Leaky^Patient"
FAKE_PATIENT_ID = "PID-0042-SECRET"
