"""What a user sees and does in OHIF 3.13's viewer page, read through Playwright.

Selectors are OHIF's own ``data-cy`` attributes; what OHIF draws is read from the page (the SVG
annotation layer, the overlay texts, canvas screenshots) and, where the page holds the numbers
(annotation points in patient coordinates, the loaded labelmap), from the ``cornerstone`` and
``cornerstoneTools`` objects OHIF's build puts on ``window``.
"""

from __future__ import annotations

import io
import re
import time
import warnings
from pathlib import Path

import numpy as np

from tests.viewer.harness import Browser, OhifServer
from tests.viewer.phantom_study import PhantomStudy

VIEWPORT = '[data-cy="viewport-pane"]'
CANVAS = f"{VIEWPORT} canvas.cornerstone-canvas"
SERIES_ITEM = '[data-cy="study-browser-thumbnail-no-image"]'  # non-image series (SEG, SR)
OVERLAY_INSTANCE = '[data-cy="viewport-overlay-bottom-right"]'  # "I:11 (10/20)"
NEXT_FINDING = '[data-cy="viewport-action-arrows-right"]'
CRASH_MARKERS = ("TypeError", "Cannot read properties", "is not a function", "Something went wrong")


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


# Shown annotations of the viewport: label lines (SVG) plus world point and image (tool state).
SHOWN_ANNOTATIONS_JS = """() => {
  const svg = document.querySelector('[data-cy="viewport-pane"] svg.svg-layer');
  if (!svg) return null;
  const all = window.cornerstoneTools.annotation.state.getAllAnnotations();
  const vp = window.cornerstone.getEnabledElements()[0].viewport;
  return [...svg.querySelectorAll('g[data-annotation-uid]')].map(g => {
    const uid = g.getAttribute('data-annotation-uid');
    const a = all.find(a => a.annotationUID === uid);
    return {uid, lines: [...g.querySelectorAll('tspan')].map(t => t.textContent),
            tool: a?.metadata?.toolName ?? null, points: a?.data?.handles?.points ?? [],
            image: a?.metadata?.referencedImageId ?? null, current: vp.getCurrentImageId()};
  });
}"""


def open_study(server: OhifServer, browser: Browser, study_uid: str) -> None:
    """Open the study in OHIF's viewer and wait until the CT is drawn."""
    browser.page.goto(server.viewer_url(study_uid), wait_until="domcontentloaded")
    px = wait_for_rendered_image(browser)
    assert px.std() > 10, "the CT never rendered"


def open_series(browser: Browser, modality: str) -> None:
    """Double-click the study browser's entry of a non-image series of this modality."""
    page = browser.page
    item = page.locator(SERIES_ITEM).filter(
        has=page.locator('[data-cy="series-modality-label"]', has_text=modality))
    item.first.wait_for(timeout=15_000)
    assert item.count() == 1, f"expected one {modality} series in the study browser, found {item.count()}"
    item.first.dblclick()


def confirm_segmentation(browser: Browser, n_segments: int, timeout: float = 15.0) -> list[str]:
    """Answer "Yes" to OHIF's "open this Segmentation?" prompt, open the segmentation panel and
    return the segment names it lists (waiting for ``n_segments`` of them)."""
    page = browser.page
    page.locator('[data-cy="yes-hydrate-btn"]').click(timeout=timeout * 1000)
    page.locator('[data-cy="panelSegmentation-btn"]').click()
    rows = page.locator('[data-cy="data-row-title"]')
    deadline = time.monotonic() + timeout
    while rows.count() < n_segments and time.monotonic() < deadline:
        page.wait_for_timeout(200)
    return [t.strip() for t in rows.all_inner_texts()]


def assert_no_crash(browser: Browser, what: str) -> None:
    """No error boundary, no console error or error toast, no crash logged at debug level, and the
    viewport pane still shows an image."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page = browser.page
    assert "Something went wrong" not in page.inner_text("body"), f"{what}: OHIF shows 'Something went wrong'"
    errors = browser.errors() + [t for t in browser.toasts() if t.type == "error"]
    assert not errors, f"{what}: console errors or error notifications:\n" + "\n".join(map(str, errors))
    # OHIF 3.13 logs the SR viewport's crash with console.debug only.
    crashes = [e for e in browser.console if e.type in ("debug", "warning")
               and any(m in e.text for m in CRASH_MARKERS)]
    assert not crashes, f"{what}: crash logged:\n" + "\n".join(map(str, crashes))
    assert page.locator(VIEWPORT).count() >= 1, f"{what}: the viewport pane is gone"
    try:  # a viewport being replaced (CT -> SR) has no canvas for a moment
        page.locator(CANVAS).first.wait_for(state="attached", timeout=5_000)
    except PlaywrightTimeout:
        raise AssertionError(f"{what}: the viewport pane shows no image") from None
    for toast in browser.toasts():
        if toast.type == "warning":
            warnings.warn(f"{what}: OHIF shows a warning: {toast.text}")


def current_instance(browser: Browser) -> int | None:
    """The instance number in the viewport's overlay ("I:11 (10/20)")."""
    overlay = browser.page.locator(OVERLAY_INSTANCE).inner_text()
    m = re.match(r"I:\s*(\d+)", overlay)
    return int(m.group(1)) if m else None


def scroll_to_instance(browser: Browser, number: int, max_steps: int = 60) -> None:
    """Scroll the viewport with the mouse wheel until it shows this instance number."""
    page = browser.page
    page.locator(VIEWPORT).first.hover()
    direction = 100
    for _ in range(max_steps):
        now = current_instance(browser)
        if now == number:
            return
        page.mouse.wheel(0, direction)
        page.wait_for_timeout(100)
        after = current_instance(browser)
        if now is not None and after is not None and abs(after - number) > abs(now - number):
            direction = -direction  # the wheel goes the other way through this series
    raise AssertionError(f"could not scroll to instance {number} (at {current_instance(browser)})")


def coloured_fraction(browser: Browser) -> float:
    """Fraction of the viewport's central pixels that are clearly coloured (an overlay, not grey CT).

    The central 70 % leaves out OHIF's coloured corner texts and orientation markers.
    """
    from PIL import Image

    png = browser.page.locator(CANVAS).first.screenshot()
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    h, w = rgb.shape[:2]
    rgb = rgb[int(0.15 * h):int(0.85 * h), int(0.15 * w):int(0.85 * w)]
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).mean())


# OHIF's loaded labelmap: per labelmap image, the CT instance it lies on and its pixels.
LABELMAP_JS = """() => window.cornerstoneTools.segmentation.state.getSegmentations().map(s => ({
  label: s.label,
  segments: Object.fromEntries(Object.entries(s.segments).map(([k, v]) => [k, v.label])),
  images: (s.representationData.Labelmap?.imageIds ?? []).map(id => {
    const im = window.cornerstone.cache.getImage(id);
    if (!im) return null;
    const px = Array.from(im.getPixelData());
    const nz = [];
    px.forEach((v, i) => { if (v) nz.push([i, v]); });
    return {ref: im.referencedImageId ?? null, rows: im.rows, columns: im.columns, nonzero: nz};
  }),
}))"""


def instance_uid(image_id: str | None) -> str | None:
    """SOP Instance UID in a cornerstone WADO-RS image id (``.../instances/<uid>/frames/1``)."""
    if not image_id or "/instances/" not in image_id:
        return None
    return image_id.split("/instances/")[1].split("/")[0]


def wait_for_sr_annotations(browser: Browser, timeout: float = 15.0) -> int:
    """Wait until OHIF has turned the SR's point groups into annotations; return how many."""
    js = """() => window.cornerstoneTools?.annotation.state.getAllAnnotations()
              .filter(a => a.metadata?.toolName === 'DICOMSRDisplay').length ?? 0"""
    deadline = time.monotonic() + timeout
    while (n := browser.page.evaluate(js)) == 0 and time.monotonic() < deadline:
        browser.page.wait_for_timeout(100)
    return n


def step_through_findings(browser: Browser, steps: int, out: Path) -> tuple[list[dict], list[str]]:
    """Every annotation drawn while stepping with the viewport's next-finding arrow, and the
    overlay text of the steps that drew none (a screenshot of each step goes to ``out``)."""
    page = browser.page
    seen: list[dict] = []
    blank = []
    for i in range(steps):
        page.wait_for_timeout(300)
        shown = page.evaluate(SHOWN_ANNOTATIONS_JS) or []
        overlay = page.locator(OVERLAY_INSTANCE).inner_text()
        page.screenshot(path=str(out / f"sr-step{i}.png"))
        seen += [{**a, "overlay": overlay, "step": i} for a in shown]
        if not shown:
            blank.append(f"step {i} at {overlay!r}")
        page.locator(NEXT_FINDING).click()
    return seen, blank


def loaded_labelmap(browser: Browser, study: PhantomStudy) -> tuple[dict[int, str], np.ndarray]:
    """(segment number -> label, label volume (k, j, i) in segment numbers) as OHIF holds it."""
    segs = browser.page.evaluate(LABELMAP_JS)
    assert len(segs) == 1, f"expected one segmentation in OHIF, found {len(segs)}"
    vol = np.zeros_like(study.labels)
    for im in segs[0]["images"]:
        assert im is not None, "a labelmap image is not in OHIF's cache"
        k = study.slice_of(instance_uid(im["ref"]))
        assert k is not None, f"labelmap image on an instance outside the CT series: {im['ref']}"
        assert (im["rows"], im["columns"]) == vol.shape[1:], "labelmap image size differs from the CT"
        for i, v in im["nonzero"]:
            vol[k].flat[i] = v
    return {int(n): label for n, label in segs[0]["segments"].items()}, vol
