"""Zero-shot scoring: probabilities by hand, decisions, not-evaluated reasons, config extension, cache."""

from __future__ import annotations

import math

import pytest
import torch

from ai_core.result import FindingResult
from ai_core.vlp.model import build_model
from ai_core.vlp.spec import tiny_spec
from ai_core.zeroshot import ZeroShotScorer, extend_findings

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(7)
    m = build_model(tiny_spec().with_updates(thresholds={"liver/cyst": 0.3, "liver/lesion": 0.9})).eval()
    with torch.no_grad():
        m.temp.fill_(0.2)
    return m


def test_probabilities_equal_a_hand_computation(model):
    scorer = ZeroShotScorer(model)
    image = torch.nn.functional.normalize(torch.randn(16), dim=0)
    probs = scorer.probabilities("liver", image)
    for finding in model.spec.findings["liver"]:
        with torch.no_grad():
            neg, pos = model.encode_texts([finding.negative, finding.positive])
        s_neg, s_pos = float(image @ neg) / 0.2, float(image @ pos) / 0.2
        expected = math.exp(s_pos) / (math.exp(s_neg) + math.exp(s_pos))
        assert probs[finding.key] == pytest.approx(expected, abs=1e-6)


def test_decisions_use_calibrated_thresholds(model):
    scorer = ZeroShotScorer(model)
    image = torch.nn.functional.normalize(torch.randn(16), dim=0)
    probs = scorer.probabilities("liver", image)
    reasons = {"spleen": "organ touches the edge of the field of view"}
    results = scorer.score({"liver": image, "spleen": None}, reasons=reasons)
    by_key = {(r.organ, r.finding): r for r in results}
    assert set(by_key) == {("liver", "cyst"), ("liver", "lesion"), ("spleen", "cyst"), ("spleen", "lesion")}
    for finding, threshold in (("cyst", 0.3), ("lesion", 0.9)):
        r = by_key[("liver", finding)]
        assert isinstance(r, FindingResult)
        assert r.threshold == threshold and r.probability == pytest.approx(probs[finding])
        assert r.decision == ("present" if probs[finding] >= threshold else "absent")
    spleen = by_key[("spleen", "cyst")]
    assert spleen.decision == "not evaluated" and spleen.probability is None
    assert spleen.reason == "organ touches the edge of the field of view"
    assert by_key[("spleen", "lesion")].threshold == 0.5  # never calibrated
    # an organ missing from the embeddings altogether is not evaluated, with a reason
    missing = scorer.score({"liver": image})
    assert {r.reason for r in missing if r.organ == "spleen"} == {"organ not found in the segmentation"}


def test_a_threshold_decides_present_and_absent(model):
    image = torch.nn.functional.normalize(torch.randn(16), dim=0)
    p = ZeroShotScorer(model).probabilities("liver", image)["cyst"]
    low = build_model(model.spec.with_updates(thresholds={"liver/cyst": max(p - 0.01, 0.0)}))
    high = build_model(model.spec.with_updates(thresholds={"liver/cyst": min(p + 0.01, 1.0)}))
    for m in (low, high):
        m.load_state_dict(model.state_dict())
        m.eval()
    assert ZeroShotScorer(low).score_organ("liver", image)[0].decision == "present"
    assert ZeroShotScorer(high).score_organ("liver", image)[0].decision == "absent"


def test_model_info_cites_name_version_and_spec_hash(model):
    info = ZeroShotScorer(model).model_info
    assert (info.name, info.version, info.demo) == ("tiny test model", "0", True)
    assert info.spec_hash == model.spec.spec_hash() and len(info.spec_hash) == 16
    changed = extend_findings(model.spec, {"liver": {"cyst": {"negative": "Liver normal.", "positive": "Liver cyst."}}})
    assert changed.spec_hash() != info.spec_hash
    assert tiny_spec().spec_hash() == tiny_spec().spec_hash()


def test_findings_extend_from_config(model):
    spec = extend_findings(
        model.spec,
        {"spleen": {"calcification": {"negative": "No splenic calcification.", "positive": "Splenic calcification.",
                                      "threshold": 0.42}},
         "liver": {"cyst": {"negative": "No hepatic cyst.", "positive": "Hepatic cyst."}}},
    )
    assert [f.key for f in spec.findings["spleen"]] == ["cyst", "lesion", "calcification"]
    assert spec.threshold("spleen", "calcification") == 0.42
    assert [f.positive for f in spec.findings["liver"] if f.key == "cyst"] == ["Hepatic cyst."]
    extended = build_model(spec)
    extended.load_state_dict(model.state_dict())
    results = ZeroShotScorer(extended.eval()).score({"spleen": torch.nn.functional.normalize(torch.randn(16), dim=0)})
    assert ("spleen", "calcification") in {(r.organ, r.finding) for r in results}
    with pytest.raises(ValueError, match="organ 'brain'"):
        extend_findings(model.spec, {"brain": {"x": {"negative": "a", "positive": "b"}}})
    with pytest.raises(ValueError, match="needs 'negative' and 'positive'"):
        extend_findings(model.spec, {"liver": {"x": {"positive": "b"}}})


def test_text_embeddings_are_computed_once(model, monkeypatch):
    scorer = ZeroShotScorer(model)
    calls = []
    original = model.encode_texts
    monkeypatch.setattr(model, "encode_texts", lambda texts: calls.append(len(texts)) or original(texts))
    image = torch.nn.functional.normalize(torch.randn(16), dim=0)
    for _ in range(3):
        scorer.score({"liver": image, "spleen": image})
    assert calls == [8]  # 2 organs x 2 findings x (negative, positive), in one batch
