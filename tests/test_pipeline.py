"""The analysis pipeline: flow, refusals, field-of-view rules, label alignment, settings, stage errors.

Small random models (a tiny VLP model, a tiny random UNet bundle) and an oracle segmenter that
returns the phantom's own labels test the flow; correctness of the shipped demo models is tested
at the end of the file once they exist.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from ai_core.geometry import lps_affine, resample_nearest
from ai_core.phantom.findings import PHANTOM_ORGANS
from ai_core.phantom.generator import generate_case, write_case
from ai_core.pipeline import (
    STAGES,
    Pipeline,
    PipelineError,
    PipelineSettings,
    StageError,
    findings_config,
)
from ai_core.result import ModelInfo
from ai_core.segmentation.base import CATALOGUE_LABELS, Segmentation, Segmenter
from ai_core.vlp.checkpoint import save_checkpoint
from ai_core.vlp.model import build_model
from ai_core.vlp.spec import PreprocessSpec, tiny_spec

TINY_SPACING = (6.0, 6.0, 9.0)  # a 64 x 64 x 47 phantom
MODEL_ORGANS = ("liver", "spleen", "kidney_left", "esophagus")


@pytest.fixture(scope="module")
def case():
    return generate_case(3, spacing=TINY_SPACING)


@pytest.fixture(scope="module")
def model():
    spec = tiny_spec(organs=MODEL_ORGANS).with_updates(
        preprocess=PreprocessSpec(spacing_mm=(6.0, 6.0, 9.0), hu_window=(-1000.0, 1000.0), min_window=(16, 32, 32)),
        thresholds={"liver/cyst": 0.4},
    )
    torch.manual_seed(0)
    return build_model(spec).eval()


class Oracle(Segmenter):
    """Returns the phantom's own labels (in catalogue values) on the volume's grid, minus ``drop``."""

    info = ModelInfo("oracle segmenter", "0")

    def __init__(self, case, drop: tuple[str, ...] = ()):
        self.case = case
        self.organ_labels = {o: CATALOGUE_LABELS[o] for o in PHANTOM_ORGANS}
        self.drop = drop

    def segment(self, volume):
        lut = np.zeros(256, dtype=np.uint8)
        for organ, value in self.case.organ_labels.items():
            lut[value] = 0 if organ in self.drop else CATALOGUE_LABELS[organ]
        img = sitk.GetImageFromArray(lut[sitk.GetArrayViewFromImage(self.case.labels)])
        img.CopyInformation(self.case.labels)
        return Segmentation(resample_nearest(img, volume.image), dict(self.organ_labels), self.info)


class Broken(Segmenter):
    info = ModelInfo("broken", "0")
    organ_labels = {"liver": 1}

    def segment(self, volume):
        raise RuntimeError("out of memory")


def write(case, path, order="ascending"):
    write_case(case, path, slice_order=order)
    return path / "series"


def test_flow_gives_every_organ_and_finding_with_timings(tmp_path, case, model):
    series = write(case, tmp_path)
    result = Pipeline(segmenter=Oracle(case), model=model).analyze(series, progress=True)
    assert result.refused is None
    assert result.series_instance_uid == case.series_uid and result.study_instance_uid == case.study_uid
    assert result.model.name == "tiny test model" and result.model.spec_hash == model.spec.spec_hash()
    assert result.segmenter.name == "oracle segmenter"
    for stage in STAGES:
        assert stage in result.timings and result.timings[stage] >= 0
    assert result.timings["total"] >= result.timings["encode"] > 0
    # every finding of the model's dictionary is there, once
    expected = {(o, f.key) for o, items in model.spec.findings.items() for f in items}
    assert {(f.organ, f.finding) for f in result.findings} == expected
    assert len(result.findings) == len(expected)
    liver = [f for f in result.findings if f.organ == "liver"]
    for f in liver:
        assert f.decision in ("present", "absent") and 0 <= f.probability <= 1
        assert f.decision == ("present" if f.probability >= f.threshold else "absent")
    assert next(f for f in liver if f.finding == "cyst").threshold == 0.4  # the calibrated one
    # organs: all phantom organs, volumes close to the phantom's own
    organs = {o.organ: o for o in result.organs}
    assert set(organs) == set(PHANTOM_ORGANS)
    assert organs["liver"].status == "evaluated" and organs["liver"].label == CATALOGUE_LABELS["liver"]
    assert organs["liver"].volume_ml == pytest.approx(case.organ_volumes_ml["liver"], rel=0.02)
    # the point of a finding is the organ's centroid, inside the organ's bounding box
    point = np.array(liver[0].point_lps)
    arr = sitk.GetArrayViewFromImage(case.labels) == case.organ_labels["liver"]
    idx = np.argwhere(arr)[:, ::-1]  # (x, y, z)
    world = idx @ lps_affine(case.labels)[:3, :3].T + lps_affine(case.labels)[:3, 3]
    np.testing.assert_allclose(point, world.mean(0), atol=3.0)
    # labels: (slices, rows, columns) uint8, one slice per source file
    assert result.labels.dtype == np.uint8
    assert result.labels.shape == (len(result.source_files), 64, 64)
    json_path = tmp_path / "analysis.json"
    result.write_json(json_path)
    assert json_path.read_text().count('"finding"') == len(expected)


@pytest.mark.parametrize("order,orientation", [("descending", "HFS"), ("shuffled", "HFS"), ("shuffled", "FFP")])
def test_labels_sit_on_the_slice_of_their_source_file(tmp_path, case, model, order, orientation):
    if orientation != case.orientation:
        case = generate_case(3, spacing=TINY_SPACING, orientation=orientation)
    series = write(case, tmp_path, order)
    result = Pipeline(segmenter=Oracle(case), model=model).analyze(series)
    truth = sitk.GetArrayViewFromImage(case.labels)
    inverse = np.linalg.inv(lps_affine(case.labels))
    to_catalogue = np.zeros(256, dtype=np.uint8)
    for organ, value in case.organ_labels.items():
        to_catalogue[value] = CATALOGUE_LABELS[organ]
    checked = 0
    for i, path in enumerate(result.source_files):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        # World position of every pixel of this file, from its own header only.
        pos = np.asarray(ds.ImagePositionPatient, dtype=float)
        row_dir, col_dir = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
        dr, dc = (float(v) for v in ds.PixelSpacing)
        r, c = np.mgrid[0 : ds.Rows, 0 : ds.Columns]
        world = pos + c[..., None] * dc * row_dir + r[..., None] * dr * col_dir
        ijk = np.rint(world @ inverse[:3, :3].T + inverse[:3, 3]).astype(int)  # truth index (x, y, z)
        expected = to_catalogue[truth[ijk[..., 2], ijk[..., 1], ijk[..., 0]]]
        np.testing.assert_array_equal(result.labels[i], expected, err_msg=f"slice {i} ({path.name})")
        checked += int((expected > 0).sum())
    assert checked > 1000  # organ voxels were compared, not only background


def test_a_refused_series_lists_every_finding_not_evaluated_with_the_reason(tmp_path, case, model):
    series = write(case, tmp_path)
    files = sorted(series.iterdir())
    positions = sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    positions[len(positions) // 2].unlink()  # a missing slice in the middle
    pipeline = Pipeline(segmenter=Oracle(case), model=model)
    result = pipeline.analyze(series)
    assert result.refused and "missing slices" in result.refused
    assert result.labels is None
    assert result.series_instance_uid == case.series_uid  # still says which series it was
    expected = {(o, f.key) for o, items in model.spec.findings.items() for f in items}
    assert {(f.organ, f.finding) for f in result.findings} == expected
    for f in result.findings:
        assert f.decision == "not evaluated" and f.probability is None
        assert result.refused in f.reason
    assert result.organs and all(o.status == "not evaluated" and result.refused in o.reason for o in result.organs)
    assert "read" in result.timings


def test_organs_cut_off_or_missing_are_not_evaluated(tmp_path, case, model):
    series = write(case, tmp_path)
    result = Pipeline(segmenter=Oracle(case, drop=("spleen",)), model=model).analyze(series)
    organs = {o.organ: o for o in result.organs}
    # The esophagus leaves the field of view at the top of a chest-abdomen scan.
    assert organs["esophagus"].status == "not evaluated"
    assert "edge of the field of view" in organs["esophagus"].reason
    for f in (f for f in result.findings if f.organ == "esophagus"):
        assert f.decision == "not evaluated" and "edge of the field of view" in f.reason
    # An organ the segmenter found nowhere.
    assert organs["spleen"].status == "not evaluated" and "not found" in organs["spleen"].reason
    for f in (f for f in result.findings if f.organ == "spleen"):
        assert f.decision == "not evaluated" and "not found" in f.reason
    assert organs["liver"].status == "evaluated"


def test_an_organ_mostly_outside_its_window_is_not_evaluated(tmp_path, case, model):
    small = model.spec.preprocess.model_copy(update={"min_inside_fraction": 1.0})
    capped = build_model(model.spec.with_updates(preprocess=small))
    capped.load_state_dict(model.state_dict())
    pipeline = Pipeline(segmenter=Oracle(case), model=capped.eval())
    from ai_core.crops import CropConfig

    # A window cap smaller than the liver: under 100 % of it fits.
    pipeline.crop_config = CropConfig.from_preprocess(small, patch=(8, 8, 8), max_window=(8, 16, 16))
    result = pipeline.analyze(write(case, tmp_path))
    liver = result.organ("liver")
    assert liver.status == "not evaluated" and "fits in its window" in liver.reason
    assert all(f.decision == "not evaluated" for f in result.findings if f.organ == "liver")


def test_a_failing_stage_is_named(tmp_path, case, model):
    series = write(case, tmp_path)
    with pytest.raises(StageError, match="segmenting series") as info:
        Pipeline(segmenter=Broken(), model=model).analyze(series)
    assert info.value.stage == "segment" and "out of memory" in str(info.value)


def random_bundle(path):
    """A tiny randomly initialised UNet as a MONAI bundle with three catalogue organs."""
    from monai.bundle import ConfigParser

    from ai_core.segmentation.bundle import write_bundle

    net_def = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 4,
               "channels": [4, 8], "strides": [2], "num_res_units": 0}
    torch.manual_seed(1)
    net = ConfigParser({"n": net_def}).get_parsed_content("n")
    return write_bundle(path, network_def=net_def, state_dict=net.state_dict(),
                        channel_def={0: "background", 1: "liver", 2: "spleen", 3: "esophagus"},
                        spacing=(6.0, 6.0, 6.0), name="random unet", version="0.0.1")


def test_settings_load_a_bundle_and_a_checkpoint_with_extra_findings(tmp_path, case, model):
    bundle = random_bundle(tmp_path / "bundle")
    ckpt = save_checkpoint(tmp_path / "model.pt", model)
    settings = PipelineSettings.from_mapping({
        "segmentation": "monai_bundle", "segmentation_path": str(bundle), "segmentation_fast": True,
        "model": str(ckpt), "device": "auto",
        "extra_findings": {"liver": {"calcification": ["No liver calcification.", "Liver calcification."]}},
    })
    pipeline = Pipeline(settings)
    assert pipeline.device == "cpu" or pipeline.device.startswith("cuda")
    result = pipeline.analyze(write(case, tmp_path / "case"))
    assert result.segmenter.name == "random unet" and result.segmenter.version == "0.0.1"
    assert ("liver", "calcification") in {(f.organ, f.finding) for f in result.findings}
    assert result.model.spec_hash != model.spec.spec_hash()  # the extended dictionary is cited
    assert result.labels.shape[0] == len(result.source_files)
    assert set(np.unique(result.labels)) <= {0, CATALOGUE_LABELS["liver"], CATALOGUE_LABELS["spleen"],
                                              CATALOGUE_LABELS["esophagus"]}


def test_bad_settings_name_the_setting(tmp_path, model):
    with pytest.raises(PipelineError, match="segmentation backend 'nnunet'"):
        Pipeline(PipelineSettings(segmentation="nnunet"), model=model)
    with pytest.raises(PipelineError, match="does not exist"):
        Pipeline(PipelineSettings(model=str(tmp_path / "missing.pt")), segmenter=Broken())
    with pytest.raises(PipelineError, match="segmentation_path"):
        Pipeline(PipelineSettings(segmentation="monai_bundle"), model=model)
    ckpt = save_checkpoint(tmp_path / "model.pt", model)
    with pytest.raises(PipelineError, match="extra_findings"):
        Pipeline(PipelineSettings(model=str(ckpt), extra_findings={"pancreas": {"cyst": ["a", "b"]}}),
                 segmenter=Broken())
    with pytest.raises(PipelineError, match="unknown pipeline setting"):
        PipelineSettings.from_mapping({"segmenter": "builtin"})


def test_findings_config_accepts_pairs_and_mappings():
    got = findings_config({"liver": {"a": ["no a", "a"], "b": {"negative": "no b", "positive": "b", "threshold": 0.7}}})
    assert got == {"liver": {"a": {"negative": "no a", "positive": "a"},
                             "b": {"negative": "no b", "positive": "b", "threshold": 0.7}}}
    with pytest.raises(PipelineError, match=r"extra_findings.liver.a"):
        findings_config({"liver": {"a": ["only one"]}})


def block_series(path):
    """A small CT series: air with a dense block (HU 400) in the middle, which a threshold segments."""
    from ai_core.phantom.series import write_series

    arr = np.full((36, 40, 48), -1000, dtype=np.int16)
    arr[10:26, 12:28, 14:34] = 400
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.2, 2.0))
    img.SetOrigin((-30.0, 10.0, -40.0))
    write_series(img, path, slice_order="shuffled")
    return path


def threshold_bundle(path):
    """A 1x1x1 convolution whose class 1 ('liver') is HU above 200."""
    from ai_core.segmentation.bundle import write_bundle

    state = {"weight": torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1, 1), "bias": torch.tensor([0.0, -0.6])}
    net = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1}
    return write_bundle(path, network_def=net, state_dict=state, channel_def={0: "background", 1: "liver"},
                        spacing=(3.0, 3.0, 3.0), name="threshold", version="1")


def test_analyze_command_writes_json_results_and_a_table(tmp_path, model, capsys):
    import json

    import yaml

    from dicom_node.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"pipelines": {"tiny": {
        "segmentation": "monai_bundle", "segmentation_path": str(threshold_bundle(tmp_path / "bundle")),
        "model": str(save_checkpoint(tmp_path / "model.pt", model)), "device": "cpu"}}}))
    series = block_series(tmp_path / "series")
    out = tmp_path / "out"
    assert main(["analyze", str(series), "--out", str(out), "--config", str(config), "--pipeline", "tiny"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "analysis.json").read_text())
    assert summary["refused"] is None
    assert {o["organ"]: o["status"] for o in summary["organs"]}["liver"] == "evaluated"
    assert len(summary["findings"]) == 8
    # the pipeline's stages and the encoders' times, without one overwriting the other
    for key in (*STAGES, "dicom_encode", "encode_seg"):
        assert key in summary["timings"], key
    table = [line.split() for line in printed.splitlines()]
    for f in summary["findings"]:
        assert [f["organ"], f["finding"]] in [row[:2] for row in table]
    assert "NOT FOR CLINICAL USE" in printed  # the tiny model says demo=True
    for kind in ("seg", "sr", "sc"):
        found = list(out.glob(f"{kind}_*.dcm"))
        assert len(found) == 1, kind
        assert pydicom.dcmread(found[0]).StudyInstanceUID == pydicom.dcmread(next(series.iterdir())).StudyInstanceUID
    # a refused series: exit 3, analysis.json with the reason, no objects
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in sorted(series.iterdir())[:5]:
        (broken / f.name).write_bytes(f.read_bytes())
    assert main(["analyze", str(broken), "--out", str(tmp_path / "out2"), "--config", str(config),
                 "--pipeline", "tiny"]) == 3
    assert "too few slices" in json.loads((tmp_path / "out2" / "analysis.json").read_text())["refused"]
    assert not list((tmp_path / "out2").glob("*.dcm"))
    # a pipeline name the config does not have: a usage error naming the known ones
    assert main(["analyze", str(series), "--out", str(out), "--config", str(config), "--pipeline", "x"]) == 2
    assert "known: tiny" in capsys.readouterr().err


def test_largest_component_per_organ_removes_fragments():
    from ai_core.components import keep_largest_components

    a = np.zeros((10, 12, 14), dtype=np.uint8)
    a[2:6, 2:6, 2:6] = 1  # organ 1: main body (64 voxels)
    a[0, 11, 13] = 1  # a stray voxel of organ 1 in a corner (on the edge of the volume)
    a[8:10, 0:2, 0:2] = 1  # a fragment of 8 voxels
    a[2:6, 7:10, 7:12] = 2  # organ 2 touching nothing else
    a[6, 5, 5] = 2  # organ 2 fragment touching organ 1 (different value: its own component)
    out = keep_largest_components(a)
    expected = np.zeros_like(a)
    expected[2:6, 2:6, 2:6] = 1
    expected[2:6, 7:10, 7:12] = 2
    np.testing.assert_array_equal(out, expected)
    assert keep_largest_components(np.zeros((3, 3, 3), np.uint8)).sum() == 0


@pytest.mark.parametrize("variant", ["plain", "mask_channel"])
def test_pipeline_probabilities_equal_the_model_on_the_same_window(case, model, variant):
    from ai_core.crops import crop_organs
    from ai_core.evaluation import phantom_volume
    from ai_core.zeroshot import ZeroShotScorer

    if variant == "mask_channel":
        spec = model.spec.with_updates(vision=model.spec.vision.model_copy(update={"mask_channel": True}))
        torch.manual_seed(2)
        model = build_model(spec).eval()
    pipeline = Pipeline(segmenter=Oracle(case), model=model)
    volume = phantom_volume(case)
    result = pipeline.analyze_volume(volume)
    segmentation = pipeline.segmenter.segment(volume)
    crops = crop_organs(volume, segmentation.labels, segmentation.organ_labels, pipeline.crop_config,
                        organs=list(model.spec.organs))
    scorer = ZeroShotScorer(model)
    checked = 0
    for organ in ("liver", "spleen", "kidney_left"):
        crop = crops.crops[organ]
        label_map = torch.from_numpy(crop.label_map(model.spec.organs))[None]
        with torch.no_grad():
            emb, valid = model.encode_organs(torch.from_numpy(crop.image)[None], label_map,
                                             [model.spec.organ_index(organ)])
        assert bool(valid[0, 0])
        expected = scorer.probabilities(organ, emb[0, 0])
        got = {f.finding: f.probability for f in result.findings if f.organ == organ}
        for key, p in expected.items():
            assert got[key] == pytest.approx(p, abs=1e-5), (organ, key)
            checked += 1
    assert checked == 6


# -- the shipped demo models --------------------------------------------------------------------

# Anatomy seeds no trainer uses (segmentation: 0.., 500000.., 900000..; VLP: balanced sets 1000 and 2000).
HELD_OUT_SEED = 7_770_000
# Findings whose decision (probability against the calibrated threshold, not only the ranking that
# AUC measures) must be right on single cases; the last test below checks every finding's AUC.
OBVIOUS = [("spleen", "enlargement"), ("heart", "enlargement"), ("liver", "steatosis"),
           ("pancreas", "calcification"), ("liver", "atrophy")]


@pytest.fixture(scope="module")
def demo_pipeline():
    from ai_core.pipeline import DEMO_SEG_DIR, DEMO_VLP_DIR

    missing = [str(p) for p in (DEMO_SEG_DIR / "configs" / "inference.json", DEMO_VLP_DIR / "model.pt")
               if not p.is_file()]
    assert not missing, f"the demo models are not installed ({', '.join(missing)}); train them with dicom-node train"
    return Pipeline(PipelineSettings(device="cpu"))


def test_demo_pipeline_decides_large_findings_on_held_out_phantoms(tmp_path, demo_pipeline):
    from ai_core.evaluation import phantom_volume
    from ai_core.phantom.generator import TRAINING_SPACING

    def decisions(result):
        return {(f.organ, f.finding): f.decision for f in result.findings}

    wrong = []
    for i, pair in enumerate(OBVIOUS):
        case = generate_case(HELD_OUT_SEED + i, findings=[pair], spacing=TRAINING_SPACING)
        result = demo_pipeline.analyze_volume(phantom_volume(case))
        assert result.model.demo and result.segmenter.demo
        if decisions(result)[pair] != "present":
            wrong.append(f"{pair} placed in seed {HELD_OUT_SEED + i}: {decisions(result)[pair]}")
    # A normal case, through the whole chain from DICOM files.
    normal = generate_case(HELD_OUT_SEED + 100, findings=[], spacing=TRAINING_SPACING)
    result = demo_pipeline.analyze(write(normal, tmp_path, "shuffled"))
    for pair in OBVIOUS:
        if decisions(result)[pair] != "absent":
            wrong.append(f"{pair} in the normal seed {HELD_OUT_SEED + 100}: {decisions(result)[pair]}")
    assert not wrong, wrong


def test_demo_models_meet_the_accuracy_goal_on_forty_fresh_phantoms(demo_pipeline):
    # Issue 3's bar, end to end (segmenter masks, not the truth): every organ's mean Dice >= 0.85,
    # macro AUC >= 0.95, no finding below 0.85, on 40 cases of a balanced set no trainer uses
    # (`dicom-node evaluate --phantoms 40 --seed 4000`: 0.902 / 0.995 / 0.958 with the shipped pair).
    import math

    from ai_core.evaluation import evaluate_phantoms
    from ai_core.phantom.findings import SUPPORTED_PAIRS

    report = evaluate_phantoms(demo_pipeline, 40, 4000)
    dice = report.mean_dice()
    aucs = {k: f.auc for k, f in report.findings.items() if not math.isnan(f.auc)}
    assert set(dice) == set(PHANTOM_ORGANS)
    assert len(aucs) == len(SUPPORTED_PAIRS), "every finding present in some cases and absent in others"
    assert not {o: d for o, d in dice.items() if d < 0.85}, dice
    assert not {k: a for k, a in aucs.items() if a < 0.85}, sorted(aucs.items(), key=lambda kv: kv[1])[:5]
    assert report.summary()["macro_auc"] >= 0.95, report.summary()
