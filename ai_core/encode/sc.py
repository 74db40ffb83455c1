"""A one-image Secondary Capture summary of an analysis, for viewers that show neither SEG nor SR.

Key slices (in the acquisition plane: axial for axial series) through each organ with a present
finding, the organ outlined and the finding's point marked, beside a table of every
(organ, finding) with its probability and decision. Demo-model results carry a red
"NOT FOR CLINICAL USE" banner across the top. Text is drawn with DejaVu Sans from matplotlib's
package data, so no system font is assumed.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from scipy import ndimage

from ai_core.catalogue import FINDINGS, ORGANS
from ai_core.encode.common import (
    NOT_FOR_CLINICAL_USE,
    Device,
    LabelIndex,
    SliceLocator,
    is_demo,
    organ_entry,
    result_instance,
)
from ai_core.result import AnalysisResult, FindingResult

logger = logging.getLogger(__name__)

PANEL = 256  # pixels per key-slice panel
MAX_PANELS = 6
COLUMNS = 3
TABLE_WIDTH = 640
ROW_HEIGHT = 18
BANNER_HEIGHT = 40
BACKGROUND = (0, 0, 0)
TEXT = (230, 230, 230)
OUTLINE = (255, 200, 0)
MARK = (0, 220, 255)
RED = (200, 0, 0)
# Display windows (centre, width) in HU.
SOFT_TISSUE = (40.0, 400.0)
LUNG = (-600.0, 1500.0)
LUNG_ORGANS = {"lung_left", "lung_right"}


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans as shipped inside matplotlib (found without importing matplotlib)."""
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("matplotlib is not installed; the SC summary uses its DejaVu Sans font")
    path = Path(next(iter(spec.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not path.is_file():
        raise RuntimeError(f"DejaVu Sans not found at {path}; reinstall matplotlib")
    return ImageFont.truetype(str(path), size)


def _hu_slice(path: Path) -> np.ndarray:
    """One source slice in HU (float32)."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.float32)
    return arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)


def _window(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    lo = centre - width / 2
    return (np.clip((hu - lo) / width, 0.0, 1.0) * 255).astype(np.uint8)


def _panel(hu: np.ndarray, mask: np.ndarray, point: tuple[float, float] | None, spacing: np.ndarray,
           window: tuple[float, float]) -> Image.Image:
    """A square panel: the windowed slice at true aspect ratio, the organ outlined, the point marked."""
    rows, cols = hu.shape
    h_mm, w_mm = rows * spacing[0], cols * spacing[1]
    scale = PANEL / max(h_mm, w_mm)
    size = (max(1, round(w_mm * scale)), max(1, round(h_mm * scale)))
    grey = np.asarray(Image.fromarray(_window(hu, *window)).resize(size, Image.BILINEAR))
    # Outline at panel resolution, so it is 2 pixels wide whatever the source matrix.
    big = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 0
    edge = big & ~ndimage.binary_erosion(big, iterations=2)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    rgb[edge] = OUTLINE
    out = Image.new("RGB", (PANEL, PANEL), BACKGROUND)
    ox, oy = (PANEL - size[0]) // 2, (PANEL - size[1]) // 2
    out.paste(Image.fromarray(rgb), (ox, oy))
    if point is not None:
        draw = ImageDraw.Draw(out)
        x = ox + (point[1] + 0.5) * size[0] / cols
        y = oy + (point[0] + 0.5) * size[1] / rows
        draw.ellipse([x - 7, y - 7, x + 7, y + 7], outline=MARK, width=2)
    return out


def _fit(text: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """The text, cut with an ellipsis where it would overflow ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _status_text(f: FindingResult) -> str:
    if f.decision == "not evaluated":
        return f"not evaluated: {f.reason or 'no reason given'}"
    p = f"{f.probability:.2f}" if f.probability is not None else "n/a"
    return f"{f.decision}  p={p}"


def render_summary(result: AnalysisResult, sources: Sequence[Dataset], index: LabelIndex | None) -> np.ndarray:
    """The summary as an RGB uint8 array (rows, columns, 3)."""
    organ_order = {k: i for i, k in enumerate(ORGANS)}
    finding_order = {k: i for i, k in enumerate(FINDINGS)}
    findings = sorted(result.findings, key=lambda f: (organ_order.get(f.organ, 99),
                                                      finding_order.get(f.finding, 99)))
    locator = SliceLocator(sources) if not result.refused else None
    # Key organs: those with a present finding, the most probable first.
    best: dict[str, FindingResult] = {}
    for f in findings:
        if f.decision == "present" and (f.organ not in best or (f.probability or 0) > (best[f.organ].probability or 0)):
            best[f.organ] = f
    key_organs = sorted(best, key=lambda k: -(best[k].probability or 0))[:MAX_PANELS] if locator else []

    panels: list[tuple[Image.Image, str]] = []
    for key in key_organs:
        organ = result.organ(key)
        g = index.geometry(organ.label) if (index is not None and organ is not None and organ.label > 0) else None
        f = best[key]
        point = None
        k = g.slice_index if g is not None else None
        if f.point_lps is not None:
            hit = locator.locate(f.point_lps)
            if hit is not None:
                k, point = hit[0], (hit[1], hit[2])
        if k is None:
            continue
        if point is None and g is not None:
            point = (float(g.row), float(g.col))
        hu = _hu_slice(Path(result.source_files[k]))
        mask = (index.labels[k] == organ.label) if g is not None else np.zeros(hu.shape, bool)
        window = LUNG if key in LUNG_ORGANS else SOFT_TISSUE
        names = ", ".join(x.finding.replace("_", " ") for x in findings if x.organ == key and x.decision == "present")
        panels.append((_panel(hu, mask, point, locator.spacing, window),
                       f"{organ_entry(key).display_name}: {names}"))

    demo = is_demo(result)
    caption_h = 22
    n_rows = max(1, -(-len(panels) // COLUMNS))
    panel_area_w = COLUMNS * PANEL
    table_rows = len(findings) + 4
    top = BANNER_HEIGHT if demo else 0
    height = top + max(n_rows * (PANEL + caption_h) + 40, table_rows * ROW_HEIGHT + 20)
    width = panel_area_w + TABLE_WIDTH
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if demo:
        draw.rectangle([0, 0, width, BANNER_HEIGHT], fill=RED)
        draw.text((10, 8), f"{NOT_FOR_CLINICAL_USE} — demo model ({result.model.label})", font=_font(20),
                  fill=(255, 255, 255))
    small, body = _font(13), _font(14)
    y0 = top + 8
    title = "AI findings summary" + ("" if panels else " — no finding present")
    if result.refused:
        title = _fit(f"Series not analysed: {result.refused}", _font(16), width - 20)
    draw.text((10, y0), title, font=_font(16), fill=TEXT)
    for i, (img, caption) in enumerate(panels):
        r, c = divmod(i, COLUMNS)
        x, y = c * PANEL, y0 + 26 + r * (PANEL + caption_h)
        canvas.paste(img, (x, y))
        draw.text((x + 4, y + PANEL + 3), _fit(caption, small, PANEL - 8), font=small, fill=TEXT)
    # Table of every (organ, finding).
    tx, ty = panel_area_w + 10, y0
    draw.text((tx, ty), "Organ", font=body, fill=TEXT)
    draw.text((tx + 170, ty), "Finding", font=body, fill=TEXT)
    draw.text((tx + 320, ty), "Result", font=body, fill=TEXT)
    ty += ROW_HEIGHT + 4
    for f in findings:
        colour = (255, 120, 100) if f.decision == "present" else (TEXT if f.decision == "absent" else (160, 160, 160))
        draw.text((tx, ty), organ_entry(f.organ).display_name, font=small, fill=colour)
        draw.text((tx + 170, ty), f.finding.replace("_", " "), font=small, fill=colour)
        draw.text((tx + 320, ty), _status_text(f)[:42], font=small, fill=colour)
        ty += ROW_HEIGHT
    ty += 6
    draw.text((tx, ty), f"Model: {result.model.label}; segmentation: {result.segmenter.label}"[:80],
              font=small, fill=TEXT)
    return np.asarray(canvas)


def _patient_orientation(source: Dataset) -> tuple[str, str]:
    """Patient Orientation letters of the source rows/columns (the panels keep that orientation)."""
    iop = np.asarray(source.ImageOrientationPatient, dtype=float)

    def letters(v: np.ndarray) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        order = np.argsort(-np.abs(v))
        out = "".join(names[i][0] if v[i] > 0 else names[i][1] for i in order if abs(v[i]) > 0.25)
        return out[:3] or "L"

    return letters(iop[:3]), letters(iop[3:])


def build_sc(
    result: AnalysisResult,
    sources: Sequence[Dataset],
    *,
    index: LabelIndex | None = None,
    device: Device | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> hd.sc.SCImage:
    """The summary as a Secondary Capture image in its own series of the original study."""
    device = device or Device()
    if index is None and result.labels is not None:
        index = LabelIndex(result.labels)
    pixels = render_summary(result, sources, index)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=sources[0],
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        **result_instance("sc", result, sources, device, result.model, series_instance_uid, sop_instance_uid),
        patient_orientation=_patient_orientation(sources[0]),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    # highdicom 0.28 has no argument for Body Part Examined; without it General Series' Laterality
    # (Type 2C) counts as required (dciodvfy). The summary shows the source's body part.
    if getattr(sources[0], "BodyPartExamined", None):
        sc.BodyPartExamined = sources[0].BodyPartExamined
    return sc
