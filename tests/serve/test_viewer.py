"""The viewer page in a real browser: Debian's headless Chromium driven by Playwright.

Playwright cannot download its own browsers offline, so it launches /usr/bin/chromium
(`executable_path`). The screenshot lands in tests/artifacts/ (gitignored); its path is
printed (`pytest -s`).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from support.data import SHARED
from support.images import make_png
from support.liveapp import KEY, radiograph

pytestmark = pytest.mark.serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
REAL_RADIOGRAPH = SHARED / "fracture-xray" / "fractured" / "001fc7ee522043ab.jpg"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium): browser test skipped")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def radiograph_file(tmp_path: Path) -> Path:
    """A real radiograph from ../shared when present, else a synthetic one."""
    if REAL_RADIOGRAPH.exists():
        return REAL_RADIOGRAPH
    path = tmp_path / "synthetic.png"
    path.write_bytes(make_png(radiograph(40)))
    return path


def test_viewer_upload_shows_api_label_and_heatmap(live_app, browser, tmp_path):
    from PIL import Image

    image = radiograph_file(tmp_path)
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    external: list[str] = []
    page.on(
        "request",
        lambda req: (
            None if req.url.startswith((live_app.url, "blob:")) else external.append(req.url)
        ),
    )
    page.goto(live_app.url + "/")
    page.fill("[data-testid=api-key]", KEY)
    page.press("[data-testid=api-key]", "Tab")  # "change": loads the model card
    page.wait_for_selector("[data-testid=model-card] dl", timeout=30_000)
    page.set_input_files("[data-testid=files]", str(image))
    card = page.locator("article.result").first
    page.wait_for_selector("article.result[data-state=heatmap-ready]", timeout=120_000)

    request_id = card.get_attribute("data-request-id")
    api = live_app.client.get(f"/v1/predictions/{request_id}").json()
    expected = api["label"] or f"abstained ({api['abstain_reason']})"
    assert card.locator("[data-testid=result-label]").inner_text() == expected
    unvalidated = set(api["probabilities"]) - set(api["validated_classes"])
    marked = card.locator(".fused .bar-row.unvalidated").evaluate_all(
        "rows => rows.map(r => r.dataset.class)"
    )
    assert set(marked) == unvalidated and card.locator(".fused .nv").count() == len(unvalidated)
    assert page.evaluate("sessionStorage.getItem('orthovision.apiKey')") == KEY
    assert "validated classes" in page.inner_text("[data-testid=model-card]")
    # A note exactly when a branch's top class differs from the fused one.
    fused_top = max(api["probabilities"], key=api["probabilities"].get)
    dissent = [n for n, p in api["branches"].items() if max(p, key=p.get) != fused_top]
    note = card.locator(".disagreement")
    assert note.count() == (1 if dissent else 0)
    if dissent:
        assert all(name in note.inner_text() for name in dissent)

    heat = card.locator("[data-testid=heatmap]")
    assert heat.evaluate("img => img.complete && img.naturalWidth") == 224
    slider = card.locator("[data-testid=opacity]")
    slider.fill("0")
    assert heat.evaluate("img => getComputedStyle(img).opacity") == "0"
    plain = np.asarray(Image.open(io.BytesIO(card.locator(".stack").screenshot())).convert("RGB"))
    slider.fill("80")
    assert heat.evaluate("img => getComputedStyle(img).opacity") == "0.8"
    shot = np.asarray(Image.open(io.BytesIO(card.locator(".stack").screenshot())).convert("RGB"))

    # The heat map is visible: colour where the grey radiograph alone had none.
    def chroma(rgb: np.ndarray) -> float:
        return float(np.abs(rgb.astype(int) - rgb.mean(axis=2, keepdims=True)).mean())

    assert chroma(plain) < 2.0 < chroma(shot)
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / "viewer.png"
    page.screenshot(path=str(path), full_page=True)
    print(f"\nviewer screenshot: {path}")
    assert external == [], f"the viewer fetched from elsewhere: {external}"
    page.close()


def test_viewer_without_a_key_says_what_is_missing(live_app, browser):
    page = browser.new_page()
    page.goto(live_app.url + "/")
    page.wait_for_function(
        "document.querySelector('[data-testid=model-card]').innerText.includes('to see the model')",
        timeout=30_000,
    )
    page.close()
