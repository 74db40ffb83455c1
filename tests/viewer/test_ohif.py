"""OHIF 3.13.2 in headless Chromium shows what the node stores in Orthanc (issue 7).

Each test gets its own Orthanc (DICOMweb on), its own OHIF server and a fresh browser profile;
screenshots and the browser console go to ``test-artifacts/viewer/``.
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ai_core.phantom import make_ct_series
from tests.peers import Orthanc
from tests.viewer.harness import Browser, OhifServer, artifacts_dir

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]

VIEWPORT = '[data-cy="viewport-pane"]'
CANVAS = f"{VIEWPORT} canvas.cornerstone-canvas"


def canvas_pixels(browser: Browser) -> np.ndarray:
    """The first viewport's canvas as a grey-level array (from a screenshot of the element)."""
    from PIL import Image

    png = browser.page.locator(CANVAS).first.screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)


def wait_for_rendered_image(browser: Browser, timeout: float = 20.0) -> np.ndarray:
    """Wait until the viewport canvas shows an image (not uniform), and return its pixels."""
    browser.page.locator(CANVAS).first.wait_for(state="visible", timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    while True:
        px = canvas_pixels(browser)
        if px.std() > 10 or time.monotonic() > deadline:
            return px
        browser.page.wait_for_timeout(250)


@pytest.fixture
def ct_study(tmp_path: Path) -> tuple[str, list[Path]]:
    """A small phantom CT series on disk: (Study Instance UID, files)."""
    files = make_ct_series(tmp_path / "ct", n_slices=20, rows=128, cols=128,
                           spacing=(2.8, 2.8, 5.0), seed=7)
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    return study_uid, files


@pytest.fixture
def orthanc(tmp_path: Path):
    """Orthanc with DICOMweb on loopback, stopped after the test."""
    with Orthanc(tmp_path / "orthanc", dicomweb=True) as o:
        yield o


@pytest.fixture
def viewer(orthanc: Orthanc, tmp_path: Path):
    """(OHIF server, browser) pointed at the test's Orthanc."""
    with OhifServer(orthanc.http_url) as server, Browser(tmp_path / "chromium-profile") as browser:
        yield server, browser


def test_ct_study_opens_and_renders(orthanc, viewer, ct_study, request):
    """The phantom CT opens in OHIF's viewer and its slice is drawn in the viewport."""
    server, browser = viewer
    study_uid, files = ct_study
    for f in files:
        orthanc.upload(f)
    out = artifacts_dir()

    t0 = time.monotonic()
    browser.page.goto(server.viewer_url(study_uid), wait_until="domcontentloaded")
    px = wait_for_rendered_image(browser)
    shown_after = time.monotonic() - t0
    browser.page.screenshot(path=str(out / "ct.png"))
    browser.dump_console(out / "ct-console.txt")

    assert browser.page.locator(VIEWPORT).count() >= 1, "OHIF shows no viewport pane"
    # A drawn phantom slice has air (black) around a grey body: neither blank nor uniform.
    dark = float((px < 20).mean())
    assert px.std() > 10 and 0.05 < dark < 0.95, (
        f"viewport canvas looks blank after {shown_after:.1f} s (std {px.std():.1f}, "
        f"dark fraction {dark:.2f}); see {out / 'ct.png'} and ct-console.txt")
    # The overlay counts the series' images: every uploaded slice reached the viewer.
    body = browser.page.inner_text("body")
    assert f"/{len(files)})" in body, f"image counter for {len(files)} slices not on the page"
    assert "Something went wrong" not in body
    errors = browser.errors()
    assert not errors, "console errors:\n" + "\n".join(map(str, errors))
