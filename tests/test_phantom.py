"""The phantom generator: determinism, labels that match the HU, findings, reports, truth files, CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from ai_core.phantom.findings import (
    BALANCED_BLOCK,
    EXCLUSIVE,
    FINDINGS,
    ORGAN_LABELS,
    SUPPORTED_PAIRS,
    balanced_pairs,
    check_pairs,
)
from ai_core.phantom.generator import TRAINING_SPACING, generate_case, write_case
from ai_core.phantom.reports import FINDING_KEYWORDS, NEGATION_CUES, abnormality_dictionary, prompt_pair

SMALL = (6.0, 6.0, 9.0)  # 64 x 64 x 47 voxels: fast


def _arr(img: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(img)


def _read_series(directory) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(directory)))
    return reader.Execute()


def test_same_seed_identical_series_and_uids(tmp_path):
    a = generate_case(21, spacing=SMALL)
    b = generate_case(21, spacing=SMALL)
    assert np.array_equal(_arr(a.image), _arr(b.image))
    assert np.array_equal(_arr(a.labels), _arr(b.labels))
    assert a.report == b.report and a.series_uid == b.series_uid
    write_case(a, tmp_path / "a", slice_order="shuffled")
    write_case(b, tmp_path / "b", slice_order="shuffled")
    fa = sorted((tmp_path / "a" / "series").iterdir())
    fb = sorted((tmp_path / "b" / "series").iterdir())
    assert [p.name for p in fa] == [p.name for p in fb] and len(fa) == a.image.GetSize()[2]
    for pa, pb in zip(fa, fb):
        assert pa.read_bytes() == pb.read_bytes()  # pixel data, UIDs, dates: everything


def test_different_seeds_differ():
    a = generate_case(1, spacing=SMALL, findings=[])
    b = generate_case(2, spacing=SMALL, findings=[])
    assert a.series_uid != b.series_uid and a.study_uid != b.study_uid
    la, lb = _arr(a.labels), _arr(b.labels)
    assert (la != lb).mean() > 0.01  # the anatomy itself differs, not only the noise
    assert a.organ_volumes_ml["liver"] != b.organ_volumes_ml["liver"]


# Expected mean HU inside each organ label of a case without findings.
HU_RANGES = {
    # portal venous phase: enhanced parenchyma
    "liver": (95, 130),
    "spleen": (85, 120),
    "pancreas": (75, 115),
    "kidney_left": (135, 185),
    "kidney_right": (135, 185),
    "gallbladder": (-5, 25),
    "stomach": (-850, 40),
    "urinary_bladder": (-5, 35),
    "lung_left": (-900, -700),
    "lung_right": (-900, -700),
    "heart": (80, 180),
    "aorta": (100, 200),
    "esophagus": (-50, 70),
}


@pytest.mark.parametrize("seed", [3, 4])
def test_labels_match_hu_regions(seed):
    case = generate_case(seed, spacing=SMALL, findings=[])
    hu, lab = _arr(case.image), _arr(case.labels)
    assert hu.dtype == np.int16 and lab.dtype == np.uint8
    assert case.labels.GetOrigin() == case.image.GetOrigin()
    assert case.labels.GetDirection() == case.image.GetDirection()
    assert set(np.unique(lab)) == {0, *ORGAN_LABELS.values()}
    for organ, value in case.organ_labels.items():
        inside = hu[lab == value]
        lo, hi = HU_RANGES[organ]
        assert inside.size > 20, f"{organ} has only {inside.size} voxels"
        assert lo <= inside.mean() <= hi, f"{organ}: mean {inside.mean():.0f} HU not in {lo}..{hi}"
    # background: air around the body, corners of every slice
    corners = hu[:, :3, :3]
    assert corners.mean() < -900
    assert case.organ_volumes_ml["liver"] > case.organ_volumes_ml["spleen"] > case.organ_volumes_ml["gallbladder"]


def test_pancreas_lies_in_fat_not_against_the_liver_or_spleen():
    # a segmenter must find its border by anatomy, as in a patient, not by a 15 HU step
    from scipy import ndimage

    for seed in (5, 6, 7):
        case = generate_case(seed, spacing=(1.5, 1.5, 3.0))
        lab, hu = _arr(case.labels), _arr(case.image)
        pan = lab == case.organ_labels["pancreas"]
        shell = ndimage.binary_dilation(pan) & ~pan
        solid = np.isin(lab[shell], [case.organ_labels["liver"], case.organ_labels["spleen"]])
        assert solid.mean() < 0.01, f"seed {seed}: {solid.mean():.1%} of the pancreas' surface touches liver or spleen"
        assert np.median(hu[shell]) < 0, "the pancreas is wrapped in fat"


def test_findings_are_in_the_image():
    pairs = [("liver", "lesion"), ("kidney_right", "cyst"), ("gallbladder", "calcification"),
             ("liver", "steatosis"), ("lung_left", "emphysema"), ("spleen", "enlargement"),
             ("kidney_left", "atrophy"), ("lung_right", "pleural_effusion")]
    spacing = (3.0, 3.0, 4.5)
    case = generate_case(8, spacing=spacing, findings=pairs)
    base = generate_case(8, spacing=spacing, findings=[])
    hu, lab = _arr(case.image), _arr(case.labels)
    bhu, blab = _arr(base.image), _arr(base.labels)
    assert {(f.organ, f.finding) for f in case.findings} == set(pairs)
    for f in case.findings:
        assert f.voxels > 0, f"{f.organ}:{f.finding} changed no voxel"
    img = case.image

    def near(f, r):
        idx = np.array(img.TransformPhysicalPointToIndex(f.center_lps))[::-1]
        sl = tuple(slice(max(i - r, 0), i + r + 1) for i in idx)
        return sl

    liver = ORGAN_LABELS["liver"]
    lesion = case.finding("liver", "lesion")
    sl = near(lesion, 1)
    assert hu[sl][lab[sl] == liver].mean() < hu[lab == liver].mean() - 10
    # ... but denser than water: solid tissue, told from a cyst by its density as a radiologist does
    assert hu[sl][lab[sl] == liver].mean() > 25 and lesion.hu >= 35
    cyst = case.finding("kidney_right", "cyst")
    sl = near(cyst, 1)
    assert hu[sl][lab[sl] == ORGAN_LABELS["kidney_right"]].mean() < 22
    gb = hu[lab == ORGAN_LABELS["gallbladder"]]
    assert gb.max() > 300 and np.median(gb) < 30
    assert hu[lab == liver].mean() < hu[lab == ORGAN_LABELS["spleen"]].mean() - 5  # steatosis
    emph = lambda h, l: (h[l == ORGAN_LABELS["lung_left"]] < -940).mean()  # noqa: E731
    assert emph(hu, lab) > emph(bhu, blab) + 0.08
    ratio = lambda o: case.organ_volumes_ml[o] / base.organ_volumes_ml[o]  # noqa: E731
    assert ratio("spleen") > 1.6
    assert ratio("kidney_left") < 0.6
    assert ratio("lung_right") < 0.95  # effusion takes the dependent pleural space out of the lung label
    fluid = (lab == 0) & (blab == ORGAN_LABELS["lung_right"])
    assert 0 < hu[fluid].mean() < 30
    # dependent: supine, so the fluid lies posterior (+y) of the remaining lung
    zs, ys, xs = np.nonzero(fluid)
    zl, yl, xl = np.nonzero(lab == ORGAN_LABELS["lung_right"])
    assert ys.mean() > yl.mean()


def test_prone_effusion_is_anterior():
    case = generate_case(8, spacing=(4.0, 4.0, 6.0), orientation="HFP", findings=[("lung_left", "pleural_effusion")])
    base = generate_case(8, spacing=(4.0, 4.0, 6.0), orientation="HFP", findings=[])
    lab, blab = _arr(case.labels), _arr(base.labels)
    fluid = np.argwhere((lab == 0) & (blab == ORGAN_LABELS["lung_left"]))
    lung = np.argwhere(lab == ORGAN_LABELS["lung_left"])
    y = lambda idx: np.array([case.labels.TransformIndexToPhysicalPoint(tuple(int(v) for v in p[::-1]))[1] for p in idx])  # noqa: E731
    assert len(fluid) > 0
    assert y(fluid[::7]).mean() < y(lung[::50]).mean()  # anterior is -y


def _check_report(case):
    present = {(f.organ, f.finding) for f in case.findings}
    asserted = set()
    for s in case.sentences:
        low = s.text.lower()
        for finding, positive in s.findings.items():
            assert finding in FINDINGS[s.organ]
            if positive:
                assert (s.organ, finding) in present, f"report asserts absent {s.organ}:{finding}: {s.text}"
                assert any(k in low for k in FINDING_KEYWORDS[finding]), s.text
                asserted.add((s.organ, finding))
            else:
                assert (s.organ, finding) not in present, f"report negates present {s.organ}:{finding}"
                for group in EXCLUSIVE:  # "normal size" beside atrophy would contradict it
                    if finding in group:
                        assert not any((s.organ, g) in present for g in group), s.text
                assert any(c in low for c in NEGATION_CUES), s.text
        if not any(s.findings.values()):
            # a normal or negating sentence: any finding word must be negated
            if any(k in low for ks in FINDING_KEYWORDS.values() for k in ks):
                assert any(c in low for c in NEGATION_CUES), s.text
        else:
            absent = [f for f in FINDINGS[s.organ] if (s.organ, f) not in present]
            for f in absent:
                assert not any(k in low for k in FINDING_KEYWORDS[f]), f"{s.text!r} mentions absent {f}"
    assert asserted == present
    for f in case.findings:
        assert any(s.text in case.report for s in case.sentences if s.findings.get(f.finding) and s.organ == f.organ)
    for organ in case.organ_labels:
        if organ in case.organs_in_fov:
            assert case.organ_sentences[organ], f"no sentence about {organ}"
        else:
            assert not case.organ_sentences.get(organ), f"{organ} is outside the image but reported"
    if not present:
        assert "IMPRESSION" in case.report


@pytest.mark.parametrize("seed", range(6))
def test_reports_agree_with_ground_truth(seed):
    case = generate_case(seed, spacing=(8.0, 8.0, 12.0), balanced_index=seed)
    _check_report(case)
    case = generate_case(100 + seed, spacing=(8.0, 8.0, 12.0))
    _check_report(case)


def test_small_field_of_view_reports_only_what_it_shows(tmp_path):
    pairs = [("urinary_bladder", "calcification"), ("liver", "cyst")]
    case = generate_case(12, spacing=(6.0, 6.0, 6.0), size=(64, 64, 12), findings=pairs)  # 72 mm of the abdomen
    assert "urinary_bladder" not in case.organs_in_fov
    assert "liver" in case.organs_in_fov and case.finding("liver", "cyst") is not None
    _check_report(case)
    assert "urinary bladder" not in case.report.lower() and "bladder stone" not in case.report.lower()
    hidden = {(f.organ, f.finding) for f in case.hidden_findings}
    assert ("urinary_bladder", "calcification") in hidden
    truth = json.loads(write_case(case, tmp_path).read_text())
    assert truth["organs"]["urinary_bladder"]["in_fov"] is False
    entry = truth["findings"]["urinary_bladder"]["calcification"]
    assert entry["present"] is False and entry["not_visible"] is True


def test_balanced_set_has_every_finding_present_and_absent():
    counts = {p: 0 for p in SUPPORTED_PAIRS}
    for i in range(BALANCED_BLOCK):
        pairs = balanced_pairs(77, i)
        check_pairs(pairs)  # exclusive findings never coincide
        for p in pairs:
            counts[p] += 1
    assert all(0 < c < BALANCED_BLOCK for c in counts.values()), counts
    case = generate_case(77, spacing=(8.0, 8.0, 12.0), balanced_index=3)
    assert {(f.organ, f.finding) for f in case.findings} == set(balanced_pairs(77, 3))
    other = generate_case(77, spacing=(8.0, 8.0, 12.0), balanced_index=4)
    assert other.series_uid != case.series_uid


def test_write_case_truth_and_label_map(tmp_path):
    case = generate_case(5, spacing=SMALL, orientation="sagittal", findings=[("liver", "cyst")])
    truth_path = write_case(case, tmp_path, slice_order="descending", transfer_syntax="jpegls")
    truth = json.loads(truth_path.read_text())
    assert truth["series_instance_uid"] == case.series_uid
    assert truth["organs"]["liver"]["label"] == ORGAN_LABELS["liver"]
    assert sum(len(v) for v in truth["findings"].values()) == len(SUPPORTED_PAIRS)
    assert truth["findings"]["liver"]["cyst"]["present"] is True
    assert truth["findings"]["liver"]["lesion"]["present"] is False
    assert truth["report"] == case.report
    series = _read_series(tmp_path / truth["series_dir"])
    labels = sitk.ReadImage(str(tmp_path / truth["label_map"]))
    assert np.allclose(series.GetOrigin(), labels.GetOrigin(), atol=1e-3)
    assert np.allclose(series.GetDirection(), labels.GetDirection(), atol=1e-5)
    assert np.array_equal(_arr(series), _arr(case.image))
    assert np.array_equal(_arr(labels), _arr(case.labels))
    ds = pydicom.dcmread(next((tmp_path / "series").iterdir()))
    assert ds.SeriesInstanceUID == case.series_uid and ds.StudyInstanceUID == case.study_uid
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy not found: install the Debian package dicom3tools"
    out = subprocess.run([exe, "-new", str(next((tmp_path / "series").iterdir()))], capture_output=True, text=True)
    assert not [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_training_resolution_is_fast():
    generate_case(0, spacing=TRAINING_SPACING)  # warm-up (imports)
    t0 = time.perf_counter()
    case = generate_case(9, spacing=TRAINING_SPACING)
    elapsed = time.perf_counter() - t0
    assert case.image.GetSize() == (128, 128, 93)
    assert elapsed < 3.0, f"a training-resolution case took {elapsed:.2f} s (about 0.3 s on an idle core)"


def test_prompts_and_dictionary_cover_every_pair():
    d = abnormality_dictionary()
    for organ, finding in SUPPORTED_PAIRS:
        neg, pos = prompt_pair(organ, finding)
        assert neg != pos
        assert any(c in neg.lower() for c in NEGATION_CUES)
        assert d[organ][finding] and all("{" not in t for t in d[organ][finding])
    with pytest.raises(ValueError):
        prompt_pair("stomach", "lesion")


def test_cli_writes_a_case(tmp_path):
    from dicom_node.cli import main

    out = tmp_path / "case"
    rc = main(["phantom", "--seed", "4", "--out", str(out), "--spacing", "8", "8", "12",
               "--orientation", "FFS", "--slice-order", "shuffled", "--finding", "liver:cyst",
               "kidney_left:lesion", "--finding", "aorta:enlargement", "--transfer-syntax", "rle"])
    assert rc == 0
    truth = json.loads((out / "truth.json").read_text())
    assert truth["findings"]["aorta"]["enlargement"]["present"]
    assert truth["findings"]["kidney_left"]["lesion"]["present"] and truth["findings"]["liver"]["cyst"]["present"]
    assert not truth["findings"]["liver"]["lesion"]["present"]
    assert (out / "report.txt").read_text() == truth["report"]
    assert truth["patient_position"] == "FFS"
    files = list((out / "series").glob("*.dcm"))
    assert len(files) == truth["files"] > 0
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert main(["phantom", "--seed", "4", "--out", str(tmp_path / "bad"), "--finding", "liver:emphysema"]) == 2
    assert main(["phantom", "--seed", "4", "--out", str(tmp_path / "bad"), "--finding", "liver"]) == 2
