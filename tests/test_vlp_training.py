"""VLP training: fVLM false-negative calibration, loss going down, checkpoint and resume, phantom windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ai_core.training.vlp import (
    OrganReport,
    TrainConfig,
    Window,
    case_windows,
    fn_calibrated_targets,
    phantom_cases,
    train_vlp,
)
from ai_core.vlp.checkpoint import load_checkpoint, read_checkpoint
from ai_core.vlp.spec import tiny_spec

torch.set_num_threads(1)


def test_fn_calibrated_soft_targets_by_hand():
    texts = ["Unremarkable liver.", "A cyst in the liver.", "The liver appears normal.", "A cyst in the liver.",
             "Hepatomegaly."]
    normal = [True, False, True, False, False]
    t = fn_calibrated_targets(texts, normal)
    half = 1 / 2
    expected = torch.tensor([
        [half, 0, half, 0, 0],  # normal texts are positives of each other
        [0, half, 0, half, 0],  # identical texts too
        [half, 0, half, 0, 0],
        [0, half, 0, half, 0],
        [0, 0, 0, 0, 1.0],  # a unique abnormal text: only itself
    ])
    assert torch.allclose(t, expected)
    assert torch.allclose(t.sum(1), torch.ones(5))


def _synthetic_windows(n_cases: int, seed: int) -> list[Window]:
    """Liver windows with or without a bright 'cyst' blob inside the organ; spleen windows normal."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_cases):
        for organ in ("liver", "spleen"):
            image = rng.normal(0.5, 0.02, (1, 32, 32, 32)).astype(np.float16)
            mask = np.zeros((32, 32, 32), dtype=bool)
            mask[4:28, 4:28, 4:28] = True
            cyst = organ == "liver" and c % 2 == 0
            if cyst:
                z, y, x = rng.integers(8, 20, 3)
                image[0, z : z + 6, y : y + 6, x : x + 6] = 0.9
            text = "A cyst in the liver." if cyst else f"Unremarkable {organ}."
            report = OrganReport(text, not cyst, {"cyst": cyst, "lesion": False})
            out.append(Window(f"case{seed}-{c}", organ, image, np.packbits(mask.ravel()), report))
    return out


def _config(tmp_path, epochs: int, **kw) -> TrainConfig:
    return TrainConfig(out_dir=tmp_path, epochs=epochs, batch_cases=4, lr=3e-3, warmup_steps=1, threads=1,
                       progress=False, dictionary={"liver": {"normal": ["Unremarkable liver."],
                                                             "cyst": ["A cyst in the liver."]}}, **kw)


def _bn_spec():
    spec = tiny_spec()
    return spec.with_updates(pooling=spec.pooling.model_copy(update={"batch_norm": True}))


def test_a_few_steps_reduce_the_loss_and_calibrate(tmp_path):
    spec = _bn_spec()
    train, val = _synthetic_windows(16, 0), _synthetic_windows(8, 1)
    path = train_vlp(spec, _config(tmp_path, epochs=6), train, val)
    report = json.loads((tmp_path / "training.json").read_text())
    losses = [h["loss"] for h in report["history"]]
    assert losses[-1] < 0.8 * losses[0], losses
    model, payload = load_checkpoint(path)
    assert "training" not in payload  # the shipped model carries no optimizer state
    assert set(model.spec.thresholds) == {"liver/cyst", "liver/lesion", "spleen/cyst", "spleen/lesion"}
    assert report["validation"]["liver/cyst"]["auc"] > 0.7


def test_checkpoint_reloads_and_training_resumes(tmp_path):
    spec = tiny_spec()
    train, val = _synthetic_windows(8, 2), _synthetic_windows(4, 3)
    train_vlp(spec, _config(tmp_path, epochs=2), train, val)
    first = read_checkpoint(tmp_path / "checkpoint.pt")
    assert first["training"]["epoch"] == 2
    steps = []
    train_vlp(spec, _config(tmp_path, epochs=3), train, val, on_step=lambda step, loss: steps.append(step))
    resumed = read_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed["training"]["epoch"] == 3
    assert steps == [first["training"]["step"] + 1, first["training"]["step"] + 2]  # one more epoch only
    assert resumed["training"]["history"][:2] == first["training"]["history"]


def test_phantom_windows_follow_the_crop_stage():
    from ai_core.training.vlp import phantom_demo_spec

    spec = phantom_demo_spec()
    case = next(phantom_cases(5, [0], spacing=(4.0, 4.0, 6.0)))
    windows = case_windows(case, spec, np.random.default_rng(0), jitter=2)
    organs = {w.organ for w in windows}
    assert {"liver", "spleen", "kidney_left", "kidney_right"} <= organs
    for w in windows:
        assert w.image.shape[0] == 1 and all(s % p == 0 for s, p in zip(w.shape, spec.vision.patch))
        assert all(s >= m for s, m in zip(w.shape, spec.preprocess.min_window))
        assert w.mask().any()
        assert set(w.report.findings) == {f.key for f in spec.findings.get(w.organ, ())}


def test_fine_tuning_adds_the_relative_channel_without_changing_the_model(tmp_path):
    from ai_core.vlp.checkpoint import CheckpointError, init_from_checkpoint, save_checkpoint
    from ai_core.vlp.model import build_model

    base = tiny_spec()
    old_spec = base.with_updates(vision=base.vision.model_copy(update={"mask_channel": True, "focal": (4, 4)}))
    torch.manual_seed(0)
    old = build_model(old_spec).eval()
    path = save_checkpoint(tmp_path / "old.pt", old)
    new_spec = old_spec.with_updates(vision=old_spec.vision.model_copy(update={"relative_channel": True}))
    new = build_model(new_spec).eval()
    widened = init_from_checkpoint(new, path)
    assert widened  # the first convolutions of the encoder and the focal path
    image = torch.rand(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(1, 32, 32, 32, dtype=torch.long)
    labels[0, 4:20, 4:20, 4:20] = 1
    image[0, 0, 8:12, 8:12, 8:12] = 0.2  # something for the new channel to see
    with torch.no_grad():
        assert torch.allclose(old.encode_organs(image, labels)[0], new.encode_organs(image, labels)[0], atol=1e-6)
    other = build_model(base.with_updates(embed_dim=8))
    with pytest.raises(CheckpointError, match="another architecture"):
        init_from_checkpoint(other, path)
    # Lesion-scale channels go after the relative one, on a model that already has it.
    rel_path = save_checkpoint(tmp_path / "rel.pt", new)
    scaled = build_model(new_spec.with_updates(
        vision=new_spec.vision.model_copy(update={"lesion_scales_mm": (4.0, 8.0)}))).eval()
    assert init_from_checkpoint(scaled, rel_path)
    with torch.no_grad():
        assert torch.allclose(new.encode_organs(image, labels)[0], scaled.encode_organs(image, labels)[0], atol=1e-6)
    # ... and a checkpoint whose channels the new model would drop or reorder is refused.
    narrower = build_model(new_spec.with_updates(
        vision=new_spec.vision.model_copy(update={"lesion_scales_mm": (8.0, 4.0, 2.0)})))
    with pytest.raises(CheckpointError, match="drops, changes or reorders"):
        init_from_checkpoint(narrower, save_checkpoint(tmp_path / "scaled.pt", scaled))
    # A wider-scale contrast channel goes last, and the model again computes what it did.
    wide_spec = new_spec.with_updates(vision=new_spec.vision.model_copy(update={"relative_extra_scales_hu": (150.0,)}))
    wide = build_model(wide_spec).eval()
    assert init_from_checkpoint(wide, rel_path)
    with torch.no_grad():
        assert torch.allclose(new.encode_organs(image, labels)[0], wide.encode_organs(image, labels)[0], atol=1e-6)
    # lesion scales added after it would move it
    moved = build_model(wide_spec.with_updates(vision=wide_spec.vision.model_copy(update={"lesion_scales_mm": (4.0,)})))
    with pytest.raises(CheckpointError, match="relative_extra_scales_hu"):
        init_from_checkpoint(moved, save_checkpoint(tmp_path / "wide.pt", wide))


def test_cli_names_a_missing_init_model_without_a_traceback(tmp_path, capsys):
    from dicom_node.cli import main

    rc = main(["train", "vlp", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "out"),
               "--init", str(tmp_path / "missing.pt"), "--train-cases", "1", "--val-cases", "1", "--epochs", "1",
               "--eval-cases", "0", "--workers", "1"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no checkpoint at" in err and "missing.pt" in err and "fix the path" in err
    assert not list((tmp_path / "w").glob("windows-*"))  # it failed before making any phantom windows


@pytest.mark.parametrize("extra, expected", [
    (["--wide-contrast", "150"], "--wide-contrast rescales the organ-relative contrast: add --relative-channel"),
    (["--relative-channel", "--wide-contrast", "wide"], "--wide-contrast 'wide': give scales in HU separated by commas"),
    (["--lesion-scales", "4"], "--lesion-scales averages the organ-relative contrast: add --relative-channel"),
])
def test_cli_names_a_bad_contrast_channel_option(tmp_path, capsys, extra, expected):
    from dicom_node.cli import main

    rc = main(["train", "vlp", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "out"), "--train-cases", "1",
               "--val-cases", "1", "--epochs", "1", "--eval-cases", "0", "--workers", "1", *extra])
    assert rc == 2
    assert expected in capsys.readouterr().err
    assert not list((tmp_path / "w").glob("windows-*"))


def test_mask_jitter_moves_the_organ_border_by_one_voxel_and_never_empties_it():
    from scipy import ndimage

    from ai_core.training.vlp import jitter_mask

    mask = np.zeros((12, 12, 12), bool)
    mask[3:9, 3:9, 3:9] = True
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(40):
        out = jitter_mask(mask, rng)
        # within one voxel of the original border, and still an organ
        assert (out & ~ndimage.binary_dilation(mask)).sum() == 0
        assert (mask & ~out & ndimage.binary_erosion(mask)).sum() == 0
        assert out.any()
        seen.add(int(out.sum()) - int(mask.sum()) > 0)
    assert seen == {True, False}  # grown and shrunk
    dot = np.zeros((5, 5, 5), bool)
    dot[2, 2, 2] = True
    assert all(jitter_mask(dot, rng).any() for _ in range(20))


def test_windows_cut_on_a_segmenters_masks_follow_its_prediction_not_the_truth(tmp_path):
    """--segmenter: fVLM trains on a segmenter's masks; the windows must be cut on those, and cached apart."""
    import SimpleITK as sitk

    from ai_core.crops import CropConfig, resample_for_crops
    from ai_core.segmentation import DEMO_BUNDLE
    from ai_core.training.vlp import phantom_demo_spec, phantom_windows, segmented, segmenter_fingerprint

    spec = phantom_demo_spec()
    case = next(phantom_cases(5, [0], spacing=(3.0, 3.0, 4.5)))
    predicted = segmented(case, DEMO_BUNDLE)
    assert predicted.reports is case.reports and predicted.image is case.image
    truth = sitk.GetArrayViewFromImage(case.labels)
    labels = sitk.GetArrayViewFromImage(predicted.labels)
    liver_t, liver_p = truth == case.organ_labels["liver"], labels == predicted.organ_labels["liver"]
    assert 0.7 < 2 * (liver_t & liver_p).sum() / (liver_t.sum() + liver_p.sum()) < 1.0  # a prediction, not a copy

    config = CropConfig.from_preprocess(spec.preprocess, patch=tuple(spec.vision.patch))
    _, lab_p, _ = resample_for_crops(case.image, predicted.labels, config)
    wins = {w.organ: w for w in phantom_windows(spec, 5, [0], 0, 1, spacing=(3.0, 3.0, 4.5), progress=False,
                                                segmenter=DEMO_BUNDLE)}
    gt = {w.organ: w for w in phantom_windows(spec, 5, [0], 0, 1, spacing=(3.0, 3.0, 4.5), progress=False)}
    assert wins.keys() == gt.keys()
    # the liver window's mask holds as many voxels as the segmenter's liver on the crop grid
    assert wins["liver"].mask().sum() == (lab_p == predicted.organ_labels["liver"]).sum()
    assert wins["liver"].mask().sum() != gt["liver"].mask().sum()
    assert wins["liver"].report is not None and wins["liver"].report.text == gt["liver"].report.text
    assert segmenter_fingerprint(None) is None
    assert segmenter_fingerprint(DEMO_BUNDLE) != segmenter_fingerprint(tmp_path)


def test_cli_names_an_unusable_segmenter_before_making_any_window(tmp_path, capsys):
    import shutil

    from ai_core.segmentation import DEMO_BUNDLE
    from dicom_node.cli import main

    no_weights = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE / "configs", no_weights / "configs")
    for bundle, says in ((tmp_path / "empty", "is not a MONAI bundle"), (no_weights, "weights of bundle")):
        bundle.mkdir(exist_ok=True)
        rc = main(["train", "vlp", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "out"),
                   "--segmenter", str(bundle), "--train-cases", "1", "--val-cases", "1", "--epochs", "1",
                   "--eval-cases", "0", "--workers", "1"])
        assert rc == 2
        err = capsys.readouterr().err
        assert "--segmenter" in err and says in err and "Traceback" not in err
    assert not list((tmp_path / "w").glob("windows-*"))
