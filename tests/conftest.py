"""Session fixtures. The builders they use live in tests/support/ (importable as
`from support.images import make_png`: pytest puts tests/ on sys.path for this conftest).
"""

from __future__ import annotations

import pytest
from support.images import make_dicom, make_jpeg, make_png


@pytest.fixture
def png_bytes():
    return make_png


@pytest.fixture
def jpeg_bytes():
    return make_jpeg


@pytest.fixture
def dicom_bytes():
    return make_dicom


@pytest.fixture(scope="session")
def live_app(tmp_path_factory):
    """The one live Ray Serve app of the session (see tests/support/liveapp.py)."""
    from support.liveapp import start_live_app, stop_live_app

    app = start_live_app(tmp_path_factory.mktemp("live-app"))
    yield app
    stop_live_app(app)
