"""/docs and /redoc work without internet: the pages load Swagger UI and ReDoc from the
service itself, never from a CDN."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.serve


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_api_docs_load_their_assets_from_the_service(live_app, page):
    html = live_app.client.get(page)
    assert html.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html.text)
    assert assets, html.text[:500]
    for url in assets:
        assert url.startswith("/"), f"{page} loads {url} from another origin"
        asset = live_app.client.get(url)
        assert asset.status_code == 200 and len(asset.content) > 10_000, url
    assert "openapi.json" in html.text
