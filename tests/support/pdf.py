"""The text of a PDF, by poppler's pdftotext (the tests that call it skip without it)."""

from __future__ import annotations

import subprocess


def pdf_text(pdf: bytes, *flags: str) -> str:
    out = subprocess.run(
        ["pdftotext", *flags, "-", "-"], input=pdf, check=True, capture_output=True
    )
    return out.stdout.decode()
