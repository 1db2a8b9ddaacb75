"""The viewer page in a real browser: Debian's headless Chromium driven by Playwright.

Playwright cannot download its own browsers offline, so it launches /usr/bin/chromium
(`executable_path`). The screenshot lands in tests/artifacts/ (gitignored); its path is
printed (`pytest -s`).
"""

from __future__ import annotations

import io
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
from support.data import SHARED
from support.images import make_dicom, make_png
from support.liveapp import KEY, radiograph
from support.polling import wait_for

pytestmark = pytest.mark.serve
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
expect = sync_api.expect

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
# Tall and larger than the model input: the viewer must show it whole, not at 224 px.
REAL_RADIOGRAPH = SHARED / "fracture-xray" / "fractured" / "01496647d70601c4.jpg"


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("chromium not installed (apt-get install chromium): browser test skipped")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield b
        b.close()


def radiograph_file(tmp_path: Path) -> Path:
    """A real radiograph from ../shared when present, else a synthetic one."""
    if REAL_RADIOGRAPH.exists():
        return REAL_RADIOGRAPH
    path = tmp_path / "synthetic.png"
    path.write_bytes(make_png(radiograph(40, h=900, w=600)))
    return path


def rect(locator) -> tuple[float, float, float, float]:
    box = locator.bounding_box()
    return box["x"], box["y"], box["width"], box["height"]


def assert_same_box(a, b, tol_px: float = 0.5) -> None:
    assert all(abs(x - y) <= tol_px for x, y in zip(rect(a), rect(b), strict=True)), (
        rect(a),
        rect(b),
    )


def canvas_size(locator) -> tuple[int, int]:
    return tuple(locator.evaluate("c => [c.width, c.height]"))


# The grey values of the image canvas (red channel), as a flat list.
PIXELS_JS = (
    "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
    ".filter((_, i) => i % 4 === 0))"
)


def scale(card) -> float:
    return float(card.locator("[data-testid=viewport]").get_attribute("data-scale"))


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

    # The full image, not the 224 px model input: the upload's own size and aspect.
    base = card.locator("[data-testid=image]")
    heat = card.locator("[data-testid=heatmap]")
    viewport = card.locator("[data-testid=viewport]")
    with Image.open(image) as source:
        source_size = source.size
    assert card.get_attribute("data-image") == "upload"
    assert canvas_size(base) == source_size and min(source_size) > 224
    # The heat map is cropped to where the image lies in the model input: its aspect is the
    # image's (to a pixel of the 224 px map), and it covers exactly the image's box.
    heat_w, heat_h = canvas_size(heat)
    assert max(heat_w, heat_h) == 224
    assert abs(heat_w / heat_h - source_size[0] / source_size[1]) < 1.5 / min(heat_w, heat_h)
    assert_same_box(heat, base)
    legend = card.locator("[data-testid=legend]")
    assert legend.is_visible() and "high attention" in legend.inner_text()
    assert "not a finding" in card.locator(".heat-note").inner_text()

    # Zoom: buttons, wheel, keyboard; pan by dragging; fit resets. The overlay follows.
    fit = scale(card)
    card.locator("[data-testid=zoom-in]").click()
    assert scale(card) == pytest.approx(fit * 1.25)
    vx, vy, vw, vh = rect(viewport)
    page.mouse.move(vx + vw / 2, vy + vh / 2)
    page.mouse.wheel(0, -300)
    # Polled from Python: the viewer's CSP (script-src 'self') forbids the string evaluation
    # behind page.wait_for_function once it has to poll.
    assert wait_for(lambda: scale(card) > fit * 1.3, 10)
    before = rect(base)
    page.mouse.down()
    page.mouse.move(vx + vw / 2 + 60, vy + vh / 2 + 30, steps=4)
    page.mouse.up()
    moved = rect(base)
    assert moved[0] - before[0] == pytest.approx(60, abs=1) and moved[1] - before[1] == (
        pytest.approx(30, abs=1)
    )
    assert_same_box(heat, base)
    viewport.focus()
    page.keyboard.press("0")
    assert scale(card) == pytest.approx(fit)
    page.keyboard.press("+")
    assert scale(card) == pytest.approx(fit * 1.25)
    card.locator("[data-testid=zoom-fit]").click()
    assert scale(card) == pytest.approx(fit)

    # Window/level maps the grey values: a narrow window changes them, reset restores them.
    original = base.evaluate(PIXELS_JS)
    wl = card.locator("[data-testid=wl-value]")
    assert wl.inner_text() == "W 256 / L 128"
    card.locator("[data-testid=window]").fill("64")
    card.locator("[data-testid=level]").fill("60")
    # The redraw runs on the next animation frame and writes the label with the pixels.
    expect(wl).to_have_text("W 64 / L 60")
    windowed = base.evaluate(PIXELS_JS)
    changed = np.asarray(windowed) != np.asarray(original)
    assert changed.mean() > 0.5
    card.locator("[data-testid=wl-reset]").click()
    assert wl.inner_text() == "W 256 / L 128" and base.evaluate(PIXELS_JS) == original

    slider = card.locator("[data-testid=opacity]")
    slider.fill("0")
    assert heat.evaluate("c => getComputedStyle(c).opacity") == "0"
    plain = np.asarray(Image.open(io.BytesIO(viewport.screenshot())).convert("RGB"))
    slider.fill("80")
    assert heat.evaluate("c => getComputedStyle(c).opacity") == "0.8"
    shot = np.asarray(Image.open(io.BytesIO(viewport.screenshot())).convert("RGB"))

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


def test_viewer_shows_a_dicom_input_whole_with_its_heat_map_in_place(live_app, browser, tmp_path):
    """A DICOM input: the service's display rendering (source size), and the heat map's
    crop is the box the explanation names (alpha compared pixel for pixel)."""
    from PIL import Image

    path = tmp_path / "wide.dcm"
    path.write_bytes(make_dicom(pixels=radiograph(9, h=400, w=640).astype(np.uint16) * 16))
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.goto(live_app.url + "/")
    page.fill("[data-testid=api-key]", KEY)
    page.set_input_files("[data-testid=files]", str(path))
    page.wait_for_selector("article.result[data-state=heatmap-ready]", timeout=120_000)
    card = page.locator("article.result").first
    base = card.locator("[data-testid=image]")
    heat = card.locator("[data-testid=heatmap]")
    assert card.get_attribute("data-image") == "display"
    assert canvas_size(base) == (640, 400)

    rid = card.get_attribute("data-request-id")
    box = live_app.client.get(f"/v1/explanations/{rid}").json()["input_box"]
    assert box == [0, 42, 224, 140]  # 640x400 fitted into 224: 224x140, centred
    layer = live_app.client.get(f"/v1/explanations/{rid}.png", params={"kind": "heatmap"})
    left, top, w, h = box
    expected = np.asarray(Image.open(io.BytesIO(layer.content)))[top : top + h, left : left + w]
    alpha = heat.evaluate(
        "c => Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data"
        ".filter((_, i) => i % 4 === 3))"
    )
    assert canvas_size(heat) == (w, h)
    np.testing.assert_array_equal(np.asarray(alpha).reshape(h, w), expected[..., 3])
    assert_same_box(heat, base)
    page.close()


def test_viewer_without_a_key_says_what_is_missing(live_app, browser):
    page = browser.new_page()
    page.goto(live_app.url + "/")
    expect(page.locator("[data-testid=model-card]")).to_contain_text(
        "to see the model", timeout=30_000
    )
    page.close()


def test_viewer_shows_the_prior_study_of_the_same_patient(live_app, browser, tmp_path):
    """Two DICOM studies of one patient: the follow-up's card lists the earlier study."""
    from pydicom.uid import generate_uid

    patient = f"PID-VIEWER-{uuid.uuid4().hex[:8]}"
    files = []
    for i, date in enumerate(("20260103", "20260201")):
        path = tmp_path / f"study{i}.dcm"
        pixels = radiograph(20 + i, h=320, w=256).astype(np.uint16) * 16
        path.write_bytes(
            make_dicom(
                pixels=pixels, PatientID=patient, StudyInstanceUID=generate_uid(), StudyDate=date
            )
        )
        files.append(path)
    page = browser.new_page(viewport={"width": 1200, "height": 1100})
    page.goto(live_app.url + "/")
    page.fill("[data-testid=api-key]", KEY)
    page.uncheck("#explain")
    for n, path in enumerate(files, start=1):
        page.set_input_files("[data-testid=files]", str(path))
        selector = f"article.result[data-state=classified] >> nth={n - 1}"
        page.wait_for_selector(selector, timeout=120_000)
    latest, earliest = page.locator("article.result").nth(0), page.locator("article.result").nth(1)
    priors = latest.locator("[data-testid=priors]")
    assert "2026-01-03: study fracture probability" in priors.inner_text()
    assert "on the prior study of 2026-01-03" in priors.inner_text()
    assert earliest.locator("[data-testid=priors]").count() == 0
    assert patient not in page.content()
    page.close()
