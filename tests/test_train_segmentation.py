"""Segmentation training: a tiny run trains, checkpoints, resumes, exports a bundle the node loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ai_core.phantom.generator import generate_case
from ai_core.segmentation import make_segmenter
from ai_core.training.segmentation import (
    CHECKPOINT,
    SegTrainConfig,
    bundle_input,
    dice_per_class,
    export_bundle,
    train_segmentation,
)
from ai_core.volume import CTVolume


def tiny(tmp_path, **kw) -> SegTrainConfig:
    values = dict(work_dir=tmp_path / "work", train_cases=2, val_cases=1, steps=2, patch=(16, 16, 16),
                  spacing=(8.0, 8.0, 8.0), channels=(4, 8), roi_size=(32, 32, 32), checkpoint_every=1,
                  phantom_spacings=((6.0, 6.0, 6.0),), threads=1)
    values.update(kw)
    return SegTrainConfig(**values)


def test_dice_per_class():
    truth = np.array([0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 2, 2, 2, 0])
    np.testing.assert_allclose(dice_per_class(pred, truth, 4)[:2], [2 / 3, 4 / 6])
    assert np.isnan(dice_per_class(pred, truth, 4)[2])


def test_tiny_run_checkpoints_resumes_and_is_seeded(tmp_path):
    config = tiny(tmp_path)
    net, dice = train_segmentation(config, progress=False)
    assert set(dice) == set(config.organs)
    state = torch.load(config.work_dir / CHECKPOINT, weights_only=False)
    assert state["step"] == 2 and len(state["history"]) == 2
    # Resuming with more steps continues from the checkpoint.
    longer = tiny(tmp_path, steps=3)
    net3, _ = train_segmentation(longer, progress=False)
    assert torch.load(config.work_dir / CHECKPOINT, weights_only=False)["step"] == 3
    # Other settings refuse to resume.
    with pytest.raises(ValueError, match="lr"):
        train_segmentation(tiny(tmp_path, lr=1e-2, steps=4), progress=False)
    # The same seed gives the same weights.
    again, _ = train_segmentation(tiny(tmp_path / "b"), progress=False)
    for (k, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_exported_bundle_is_the_builtin_backend(tmp_path):
    config = tiny(tmp_path, steps=1)
    net, dice = train_segmentation(config, progress=False)
    bundle = export_bundle(config, net, tmp_path / "bundle", dice=dice, command="test", seconds=1.0)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["training"]["command"] == "test"
    # The organs that hold cysts get their fluid notches back (ai_core.components.fill_fluid_notches).
    assert meta["cleanup"]["fluid_notches"]["organs"] == ["liver", "pancreas", "kidney_left", "kidney_right"]
    seg = make_segmenter("builtin", bundle_dir=bundle)
    assert seg.info.demo
    assert seg.fluid_notches is not None
    assert set(seg.organ_labels) == set(config.organs)
    case = generate_case(5, spacing=(6.0, 6.0, 6.0), orientation="coronal")
    vol = CTVolume(image=case.image, files=[], study_uid="1", series_uid="2", frame_of_reference_uid=None)
    result = seg.segment(vol)
    assert result.labels.GetSize() == case.image.GetSize()
    assert set(np.unique(result.array())) <= {0, *seg.organ_labels.values()}


def test_cli_trains_and_exports(tmp_path, capsys):
    from dicom_node.cli import main

    rc = main(["train", "segmentation", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "b"),
               "--steps", "1", "--train-cases", "1", "--val-cases", "1", "--patch", "16", "16", "16",
               "--spacing", "8", "8", "8", "--channels", "4", "8", "--phantom-spacing", "6", "6", "6",
               "--threads", "1", "--eval-cases", "1",
               "--eval-spacing", "6", "6", "6"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "validation Dice per organ" in out and "bundle written" in out and "end-to-end Dice" in out
    assert (tmp_path / "b" / "models" / "model.pt").is_file()


def test_device_is_an_option_and_a_missing_gpu_is_named(tmp_path, capsys):
    """Both trainers take --device; auto falls back to the CPU, cuda without a GPU is a one-line error."""
    from dicom_node.cli import main

    small = ["--steps", "1", "--train-cases", "1", "--val-cases", "1", "--patch", "16", "16", "16",
             "--spacing", "8", "8", "8", "--channels", "4", "8", "--phantom-spacing", "6", "6", "6",
             "--threads", "1", "--eval-cases", "0", "--no-export"]
    assert main(["train", "segmentation", "--work-dir", str(tmp_path / "a"), "--device", "auto", *small]) == 0
    if torch.cuda.is_available():  # a GPU machine: cuda trains like auto did
        assert main(["train", "segmentation", "--work-dir", str(tmp_path / "c"), "--device", "cuda", *small]) == 0
        return
    capsys.readouterr()
    assert main(["train", "segmentation", "--work-dir", str(tmp_path / "c"), "--device", "cuda", *small]) == 2
    assert "torch sees no GPU" in capsys.readouterr().err
    assert main(["train", "vlp", "--work-dir", str(tmp_path / "v"), "--device", "cuda", "--train-cases", "1",
                 "--val-cases", "1", "--epochs", "1", "--eval-cases", "0", "--workers", "1"]) == 2
    assert "torch sees no GPU" in capsys.readouterr().err
    assert not (tmp_path / "v").exists() or not list((tmp_path / "v").glob("windows-*"))


def test_fine_tuning_starts_from_a_bundle_and_refuses_another_network(tmp_path):
    config = tiny(tmp_path, steps=1)
    net, dice = train_segmentation(config, progress=False)
    bundle = export_bundle(config, net, tmp_path / "bundle", dice=dice, command="test")
    # lr 0: the fine-tuned network is exactly the bundle's, so its weights were the starting point
    tuned, _ = train_segmentation(tiny(tmp_path / "ft", steps=1, lr=0.0, init_from=str(bundle),
                                       balanced_findings=True), progress=False)
    start = torch.load(bundle / "models" / "model.pt", weights_only=False)
    tuned_bundle = export_bundle(tiny(tmp_path / "ft", init_from=str(bundle)), tuned, tmp_path / "tuned",
                                 command="fine-tune")
    lineage = json.loads((tuned_bundle / "configs" / "metadata.json").read_text())["training"]["initial_weights"]
    assert lineage["path"] == str(bundle) and lineage["training"]["command"] == "test"
    for k, v in tuned.state_dict().items():
        if v.dtype.is_floating_point and "running" not in k:  # batch-norm statistics move without lr
            assert torch.equal(v, start[k]), k
    with pytest.raises(ValueError, match="not for this network"):
        train_segmentation(tiny(tmp_path / "other", channels=(4, 16), init_from=str(bundle)), progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        train_segmentation(tiny(tmp_path / "none", init_from=str(tmp_path / "nothing")), progress=False)


def test_balanced_training_phantoms_are_the_balanced_set(monkeypatch):
    import ai_core.phantom.generator as generator
    from ai_core.phantom.findings import balanced_pairs
    from ai_core.training.segmentation import make_case

    placed = []

    def spy(seed, **kw):
        case = original(seed, **kw)
        placed.append(sorted((o, f) for o, fs in case.truth().items() for f, v in fs.items() if v))
        raise StopIteration  # the phantom is all this test needs

    original = generator.generate_case
    monkeypatch.setattr(generator, "generate_case", spy)
    config = SegTrainConfig(work_dir="unused", balanced_findings=True, phantom_spacings=((8.0, 8.0, 8.0),))
    for i in range(3):
        with pytest.raises(StopIteration):
            make_case(config, None, "train", i)
    assert placed == [sorted(balanced_pairs(0, i)) for i in range(3)]


def test_focal_patches_are_centred_on_the_placed_cysts_and_lesions():
    from ai_core.training.segmentation import make_case, sample_patch

    config = SegTrainConfig(work_dir="unused", spacing=(3.0, 3.0, 4.0), phantom_spacings=((3.0, 3.0, 4.5),),
                            balanced_findings=True, focal_fraction=1.0)
    tc = make_case(config, bundle_input(config), "train", 0)
    case = generate_case(0, balanced_index=0, spacing=(3.0, 3.0, 4.5))  # the findings make_case placed
    focal = [f for f in case.findings if f.present and f.finding in ("cyst", "lesion")]
    assert focal and len(tc.focal) == len(focal), "one centre per placed cyst or lesion"
    for (i, j, k), f in zip(tc.focal, focal):
        near = tc.labels[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2, max(k - 1, 0):k + 2]
        assert (near == config.organs.index(f.organ) + 1).any(), f"{f.organ} {f.finding}: centre outside its organ"
    # mark the centres with a value no scaled CT voxel has; every focal patch holds one
    for i, j, k in tc.focal:
        tc.image[0, i, j, k] = -0.5
    rng = np.random.default_rng(0)
    for _ in range(8):
        img, _ = sample_patch(tc, (16, 16, 16), rng, len(config.organs) + 1, 0.0, focal_fraction=1.0)
        assert (img[0] == -0.5).any()
    # a case without focal findings draws organ-centred patches
    tc.focal = np.zeros((0, 3), dtype=np.int64)
    _, lab = sample_patch(tc, (16, 16, 16), rng, len(config.organs) + 1, 1.0, focal_fraction=1.0)
    assert (lab > 0).any()
