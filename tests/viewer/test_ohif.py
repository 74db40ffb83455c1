"""OHIF 3.13.2 in headless Chromium shows what the node stores in Orthanc (issue 7).

One Orthanc (DICOMweb on) and one OHIF server serve the module; each test uploads its own study
(its own patient and UIDs) and drives a fresh browser profile. Screenshots and each test's
browser console go to ``test-artifacts/viewer/``. Ground truth comes from the phantoms (exact
organ masks), never from the encoders under test.
"""

from __future__ import annotations

import re
import shutil
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ai_core.phantom import make_ct_series
from tests.peers import Orthanc
from tests.viewer.harness import Browser, OhifServer, artifacts_dir, require_dicomweb_plugin
from tests.viewer.ohif_page import (
    VIEWPORT,
    assert_no_crash,
    coloured_fraction,
    confirm_segmentation,
    instance_uid,
    loaded_labelmap,
    open_series,
    open_study,
    scroll_to_instance,
    step_through_findings,
    wait_for_rendered_image,
    wait_for_sr_annotations,
)
from tests.viewer.phantom_study import ORGANS as PHANTOM_ORGANS
from tests.viewer.phantom_study import make_phantom_study, phantom_result

pytestmark = [pytest.mark.browser, pytest.mark.timeout(120)]


@pytest.fixture
def ct_study(tmp_path: Path) -> tuple[str, list[Path]]:
    """A small phantom CT series on disk: (Study Instance UID, files)."""
    files = make_ct_series(tmp_path / "ct", n_slices=20, rows=128, cols=128,
                           spacing=(2.8, 2.8, 5.0), seed=7, patient_id="VIEWER-CT")
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    return study_uid, files


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc with DICOMweb on loopback for this module (each test uploads its own study, with
    its own UIDs); stopped after the last test."""
    require_dicomweb_plugin()
    with Orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True) as o:
        yield o


@pytest.fixture(scope="module")
def ohif(orthanc: Orthanc):
    """The OHIF server in front of the module's Orthanc."""
    with OhifServer(orthanc.http_url) as server:
        yield server


@pytest.fixture
def viewer(ohif: OhifServer, tmp_path: Path, request):
    """(OHIF server, a fresh browser); the last page state and the whole console are saved as
    ``<test>-last.png`` / ``<test>-console.txt`` whatever the outcome."""
    with Browser(tmp_path / "chromium-profile") as browser:
        yield ohif, browser
        out, name = artifacts_dir(), request.node.name
        browser.dump_console(out / f"{name}-console.txt")
        try:
            browser.page.screenshot(path=str(out / f"{name}-last.png"), timeout=5_000)
        except Exception as e:  # a dead page must not hide the test's own failure
            (out / f"{name}-last.txt").write_text(f"no screenshot: {e}\n")


def test_ct_study_opens_and_renders(orthanc, viewer, ct_study):
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

    assert browser.page.locator(VIEWPORT).count() >= 1, "OHIF shows no viewport pane"
    # A drawn phantom slice has air (black) around a grey body: neither blank nor uniform.
    dark = float((px < 20).mean())
    assert px.std() > 10 and 0.05 < dark < 0.95, (
        f"viewport canvas looks blank after {shown_after:.1f} s (std {px.std():.1f}, "
        f"dark fraction {dark:.2f}); see {out / 'ct.png'}")
    # The overlay counts the series' images: every uploaded slice reached the viewer.
    body = browser.page.inner_text("body")
    assert f"/{len(files)})" in body, f"image counter for {len(files)} slices not on the page"
    assert_no_crash(browser, "CT")


# --- the node's SEG and SR -------------------------------------------------------------------

def encode(result, kinds: tuple[str, ...], out: Path) -> dict[str, Path]:
    """The node's result objects for ``result``, written to ``out``; fails if the encoders are missing."""
    try:
        from ai_core.encode import encode_results, write_results
    except ImportError as e:
        pytest.fail(f"the result encoders (ai_core.encode.encode_results, issue 5) are missing: {e}")
    return write_results(encode_results(result, kinds=kinds), out)


@pytest.fixture
def phantom(tmp_path: Path, request):
    """The phantom CT with exact organ masks and its analysis result; UIDs differ per test."""
    study = make_phantom_study(tmp_path / "ct", seed=zlib.crc32(request.node.name.encode()))
    return study, phantom_result(study)


def test_seg_loads_as_overlay_with_every_segment(orthanc, viewer, phantom, tmp_path):
    """The node's SEG opens over the CT after OHIF's prompt; the panel lists every organ segment
    and OHIF's labelmap equals the phantom's organ masks voxel for voxel."""
    from ai_core.catalogue import organ as organ_entry

    server, browser = viewer
    study, result = phantom
    paths = encode(result, ("seg",), tmp_path / "results")
    for f in [*study.files, paths["seg"]]:
        orthanc.upload(f)
    seg = pydicom.dcmread(paths["seg"], stop_before_pixels=True)
    expected = [s.SegmentLabel for s in seg.SegmentSequence]
    evaluated = [o.organ for o in result.organs if o.status == "evaluated"]
    by_name = {organ_entry(key).display_name: key for key in evaluated}
    assert sorted(expected) == sorted(by_name), f"SEG segments {expected} vs evaluated organs {evaluated}"
    out = artifacts_dir()
    page = browser.page

    open_study(server, browser, study.study_uid)
    assert coloured_fraction(browser) < 0.001, "colour in the viewport before the SEG was opened"
    open_series(browser, "SEG")
    shown = confirm_segmentation(browser, len(expected))
    # The slice with the most organs, as a user would scroll to it, for the screenshot.
    k_best = max(range(len(study.files)),
                 key=lambda k: (len(np.unique(study.labels[k])), int((study.labels[k] > 0).sum())))
    scroll_to_instance(browser, study.instance_numbers[k_best])
    page.wait_for_timeout(300)
    page.screenshot(path=str(out / "seg.png"))

    assert shown == expected, f"segment panel shows {shown}, the SEG has {expected}"
    coloured = coloured_fraction(browser)
    assert coloured > 0.002, f"no segmentation overlay drawn on the CT ({coloured:.4f} coloured); see seg.png"
    assert_no_crash(browser, "SEG")

    # Every segment sits exactly where the organ is: OHIF's labelmap against the phantom's masks.
    segments, loaded = loaded_labelmap(browser, study)
    assert sorted(segments.values()) == sorted(expected), f"OHIF segments {segments} vs SEG {expected}"
    for number, name in segments.items():
        truth = study.labels == PHANTOM_ORGANS[by_name[name]][0]
        got = loaded == number
        wrong = int((truth != got).sum())
        assert wrong == 0, (f"segment {number} ({name}): {wrong} voxels differ from the organ mask "
                            f"({int(got.sum())} shown, {int(truth.sum())} expected)")


def check_arrow(f, a: dict, study) -> list[str]:
    """What is wrong with the arrow shown for a present finding (empty when it is right)."""
    what = f"{f.organ}/{f.finding}"
    if a["image"] != a["current"]:
        return [f"{what}: arrow drawn for another image than the one shown"]
    k = study.slice_of(instance_uid(a["image"]))
    if k is None or not a["points"]:
        return [f"{what}: arrow not on a CT slice of the series ({a['image']})"]
    tip = np.asarray(a["points"][0], float)
    problems = []
    if study.voxel(tip)[0] != k:
        problems.append(f"{what}: arrow tip z={tip[2]:.1f} is not on slice {k}")
    number = study.instance_numbers[k]
    if not re.match(rf"I:\s*{number}\b", a["overlay"]):
        problems.append(f"{what}: viewport shows {a['overlay']!r}, not instance {number} (slice {k})")
    if study.label_at(tip) != PHANTOM_ORGANS[f.organ][0]:
        problems.append(f"{what}: arrow tip {tip.round(1)} is not on the {f.organ}")
    if f.point_lps is not None:
        d = np.abs(tip - np.asarray(f.point_lps))
        if d[2] > study.spacing[2] / 2 or np.hypot(d[0], d[1]) > 2 * study.spacing[0]:
            problems.append(f"{what}: arrow tip {tip.round(1)} is far from the finding at "
                            f"{np.round(f.point_lps, 1)}")
    return problems


def test_sr_shows_every_present_finding_on_its_slice(orthanc, viewer, phantom, tmp_path):
    """The node's SR opens without crashing; each present finding has an arrow on its organ, on the
    slice shown, labelled with its probability, organ and finding."""
    from ai_core.catalogue import finding as finding_entry
    from ai_core.catalogue import organ as organ_entry

    server, browser = viewer
    study, result = phantom
    paths = encode(result, ("seg", "sr"), tmp_path / "results")
    for f in [*study.files, paths["seg"], paths["sr"]]:
        orthanc.upload(f)
    out = artifacts_dir()

    open_study(server, browser, study.study_uid)
    open_series(browser, "SR")
    n_annotations = wait_for_sr_annotations(browser)
    assert_no_crash(browser, "SR")
    assert n_annotations > 0, "OHIF made no annotation from the SR's point groups"

    # OHIF 3.13.2 sometimes draws nothing on the slice it first jumps to (the SVG layer is drawn
    # before the annotations exist, and stepping between findings on the same slice does not
    # redraw); changing slice draws them. So: step through every finding twice (the arrows
    # cycle), collect what is drawn, and report blank steps as a warning, not a failure.
    shown, blank = step_through_findings(browser, 2 * len(result.findings) + 2, out)
    assert_no_crash(browser, "SR after stepping through the findings")
    if blank:
        warnings.warn("OHIF drew no SR annotation on " + ", ".join(blank))
    best = max(range(2 * len(result.findings) + 2), key=lambda i: sum(a["step"] == i for a in shown))
    shutil.copy(out / f"sr-step{best}.png", out / "sr.png")

    problems = []
    for f in (f for f in result.findings if f.decision == "present"):
        prob = re.compile(rf"(?<![\d.]){f.probability:.2f}(?!\d)")
        mine = [a for a in shown if any(prob.search(line) for line in a["lines"])]
        if not mine:
            problems.append(f"{f.organ}/{f.finding}: no arrow labelled {f.probability:.2f}")
            continue
        problems += check_arrow(f, mine[0], study)
        # The label names the organ, with its side (both kidneys can be on one slice), and the finding.
        organ, kind = organ_entry(f.organ), finding_entry(f.finding)
        words = [organ.code.meaning, kind.code.meaning]
        if organ.laterality is not None:
            words.append(organ.laterality.meaning)
        text = " ".join(mine[0]["lines"]).lower()
        missing = [w for w in words if w.lower() not in text]
        if missing:
            problems.append(f"{f.organ}/{f.finding}: label {mine[0]['lines']} does not name {missing}")
    assert not problems, "\n".join(problems) + "\nshown while stepping:\n" + "\n".join(
        f"{a['overlay']} {a['lines']} {a['points']}" for a in shown)


def segment_only_sr(study, seg_path: Path, out: Path) -> Path:
    """An SR whose only measurement group references a SEG segment: the layout that crashes
    OHIF 3.13.2's SR viewport (issue 5). Built here to prove the crash checks above catch it."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    seg = pydicom.dcmread(seg_path)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="liver"),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(study.series_uid)),
        finding_type=hd.sr.CodedConcept("52988006", "SCT", "Lesion"))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(uid=hd.UID(), name="test"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion, imaging_measurements=[group])
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*map(pydicom.dcmread, study.files), seg], content=report, series_number=99,
        series_instance_uid=hd.UID(), sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="test", series_description="segment-only SR")
    sr.save_as(out, enforce_file_format=True)
    return out


def test_crash_checks_catch_the_sr_viewport_crash(orthanc, viewer, phantom, tmp_path):
    """The harness notices OHIF's SR viewport crash, which OHIF logs with console.debug only."""
    server, browser = viewer
    study, result = phantom
    paths = encode(result, ("seg",), tmp_path / "results")
    sr = segment_only_sr(study, paths["seg"], tmp_path / "segment-only-sr.dcm")
    for f in [*study.files, paths["seg"], sr]:
        orthanc.upload(f)

    open_study(server, browser, study.study_uid)
    open_series(browser, "SR")
    crash = re.compile("ReferencedSOPSequence|Something went wrong")
    caught = ""
    deadline = time.monotonic() + 15
    while not crash.search(caught) and time.monotonic() < deadline:
        browser.page.wait_for_timeout(250)
        try:
            assert_no_crash(browser, "segment-only SR")
        except AssertionError as e:
            caught = str(e)
    assert crash.search(caught), f"the crash checks did not name OHIF's SR viewport crash: {caught!r}"
