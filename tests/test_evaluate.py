"""Evaluation metrics on hand-made arrays, phantom scoring with an oracle segmenter, and the command."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from ai_core.evaluation import (
    dice,
    dice_per_label,
    evaluate_phantoms,
    roc_auc,
    sensitivity_specificity,
    youden_threshold,
)
from ai_core.phantom.generator import generate_case
from ai_core.pipeline import Pipeline
from ai_core.vlp.checkpoint import save_checkpoint
from ai_core.vlp.model import build_model
from ai_core.vlp.spec import PreprocessSpec, tiny_spec
from tests.test_pipeline import TINY_SPACING, Oracle, random_bundle

LAST_LINE = re.compile(r"^dice_min=(\d\.\d{3}|nan) macro_auc=(\d\.\d{3}|nan) min_auc=(\d\.\d{3}|nan)$")


def tiny_model(organs=("liver", "kidney_left", "gallbladder")):
    spec = tiny_spec(organs=organs).with_updates(
        preprocess=PreprocessSpec(spacing_mm=TINY_SPACING, hu_window=(-1000.0, 1000.0), min_window=(16, 32, 32)),
        thresholds={"liver/cyst": 0.5, "liver/lesion": 0.5},
    )
    torch.manual_seed(0)
    return build_model(spec).eval()


def test_dice_by_hand():
    a = np.array([1, 1, 0, 0], dtype=bool)
    b = np.array([1, 0, 1, 0], dtype=bool)
    assert dice(a, b) == pytest.approx(0.5)
    assert dice(a, a) == 1.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dice(a, ~a) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice(a, b[:3])


def test_dice_per_label_matches_dice_of_each_mask():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, size=(6, 7, 8)).astype(np.uint8)
    truth = rng.integers(0, 4, size=(6, 7, 8)).astype(np.uint8)
    pairs = {"a": (1, 2), "b": (3, 3), "c": (0, 1)}  # c: not segmented -> 0
    got = dice_per_label(pred, truth, pairs)
    assert got["a"] == pytest.approx(dice(pred == 1, truth == 2))
    assert got["b"] == pytest.approx(dice(pred == 3, truth == 3))
    assert got["c"] == 0.0


def test_auc_sensitivity_specificity_by_hand():
    labels = [0, 0, 1, 1]
    assert roc_auc(labels, [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert roc_auc(labels, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc(labels, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert roc_auc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert math.isnan(roc_auc([1, 1], [0.2, 0.9]))
    sens, spec = sensitivity_specificity([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1], 0.5)
    assert (sens, spec) == (0.5, 0.5)
    sens, spec = sensitivity_specificity([1, 1, 0, 0], [0.9, 0.5, 0.49, 0.1], 0.5)  # >= threshold is present
    assert (sens, spec) == (1.0, 1.0)
    assert math.isnan(sensitivity_specificity([0, 0], [0.1, 0.2], 0.5)[0])


def test_youden_threshold_separates_the_classes():
    t = youden_threshold([0.1, 0.2, 0.6, 0.7], [0, 0, 1, 1])
    assert 0.2 < t < 0.6
    assert sensitivity_specificity([0, 0, 1, 1], [0.1, 0.2, 0.6, 0.7], t) == (1.0, 1.0)
    assert youden_threshold([0.3, 0.4], [1, 1]) == 0.5


def test_phantom_evaluation_with_the_true_labels_gives_dice_one_and_the_truth():
    model = tiny_model()
    cases = [generate_case(21, balanced_index=i, spacing=TINY_SPACING) for i in range(3)]

    class PerCase(Oracle):
        """The oracle of whichever case is being analysed (matched by series UID)."""

        def segment(self, volume):
            self.case = next(c for c in cases if c.series_uid == volume.series_uid)
            return super().segment(volume)

    pipeline = Pipeline(segmenter=PerCase(cases[0]), model=model)
    report = evaluate_phantoms(pipeline, 3, 21, cases=iter(cases))
    assert report.cases == 3 and report.refused == 0
    means = report.mean_dice()
    assert set(means) == set(cases[0].organs_in_fov)
    assert all(v == pytest.approx(1.0) for v in means.values()), means
    liver_cyst = report.findings["liver/cyst"]
    assert len(liver_cyst.labels) == 3 and liver_cyst.threshold == 0.5
    assert liver_cyst.labels == [int(c.truth()["liver"]["cyst"]) for c in cases]
    # case by case, the same truth and probabilities the AUCs are computed from
    assert [r["case"] for r in report.per_case] == [0, 1, 2]
    per_case = [r["findings"]["liver/cyst"] for r in report.per_case]
    assert [int(r["present"]) for r in per_case] == liver_cyst.labels
    assert [r["probability"] for r in per_case] == pytest.approx(liver_cyst.scores, abs=1e-4)
    assert all(r["dice"]["liver"] == pytest.approx(1.0) for r in report.per_case)
    # a pair the phantom never places (gallbladder cyst) is not scored
    assert "gallbladder/cyst" not in report.findings
    assert report.summary()["dice_min"] == pytest.approx(1.0)


def test_evaluate_command_on_four_tiny_phantoms(tmp_path, capsys):
    import yaml

    from dicom_node.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"pipelines": {"default": {
        "segmentation": "monai_bundle", "segmentation_path": str(random_bundle(tmp_path / "bundle")),
        "model": str(save_checkpoint(tmp_path / "model.pt", tiny_model())), "device": "cpu"}}}))
    out = tmp_path / "eval"
    code = main(["evaluate", "--phantoms", "4", "--seed", "5", "--config", str(config), "--out", str(out),
                 "--no-progress"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert LAST_LINE.match(printed[-1]), printed[-1]
    assert any(line.startswith("liver/cyst") for line in printed)
    assert any(line.split()[:1] == ["liver"] for line in printed)  # the Dice table
    data = json.loads((out / "evaluation.json").read_text())
    assert data["cases"] == 4 and data["seed"] == 5
    assert [r["case"] for r in data["per_case"]] == [0, 1, 2, 3]
    assert {k for r in data["per_case"] for k in r["findings"]} == set(data["findings"])
    for d in data["dice"].values():
        assert 0.0 <= d["mean"] <= 1.0
    png = (out / "roc_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
