"""Checkpoints: the fVLM reference layout and loader, and the project's own format."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ai_core.vlp.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_fvlm_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from ai_core.vlp.model import build_model
from ai_core.vlp.spec import MINILM_PACKAGE, TextSpec, fvlm_ctrate_spec, tiny_spec

torch.set_num_threads(1)

# The reference listing (name, shape, dtype of each of the 364 entries of an fVLM checkpoint).
LISTING = Path(__file__).parent / "data" / "fvlm_state_dict.tsv"

DTYPES = {"torch.float32": torch.float32, "torch.int64": torch.int64}


def _listing() -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for line in LISTING.read_text().splitlines():
        name, shape, dtype = line.split("\t")
        dims = shape.strip("[]")
        out[name] = (tuple(int(d) for d in dims.split(",")) if dims else (), dtype)
    return out


def test_listing_facts():
    listing = _listing()
    assert len(listing) == 364
    prefixes = {}
    for name in listing:
        prefixes[name.split(".")[0]] = prefixes.get(name.split(".")[0], 0) + 1
    assert prefixes == {
        "temp": 1, "query_tokens": 1, "visual_encoder": 149, "text_encoder": 199, "text_proj": 2,
        "attention": 4, "vision_projs": 8,
    }


def test_vit_b_from_fvlm_spec_has_exactly_the_reference_layout():
    with torch.device("meta"):
        model = build_model(fvlm_ctrate_spec(), load_text_weights=False)
    ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items()}
    assert ours == _listing()
    n_params = sum(p.numel() for p in model.parameters())
    assert 200e6 < n_params < 210e6


def _reference_checkpoint(extra_harmless: bool = True) -> dict:
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, (shape, dtype) in _listing().items():
        if dtype == "torch.int64":
            state[name] = torch.arange(shape[-1]).expand(shape).clone()
        elif name == "temp":
            state[name] = torch.tensor(0.0123)
        else:
            state[name] = torch.empty(shape).uniform_(-0.05, 0.05, generator=g)
    # tied in the reference model, so saved as one tensor under both names
    state["text_encoder.cls.predictions.decoder.weight"] = state["text_encoder.embeddings.word_embeddings.weight"]
    if extra_harmless:
        state["text_encoder.embeddings.token_type_embeddings.weight"] = torch.zeros(2, 768)
    # as the reference saves it: {'model', 'optimizer', 'config', 'scaler', 'epoch'}, no 'module.' prefix
    return {"model": state, "optimizer": {}, "config": {}, "scaler": None, "epoch": 9}


def test_reference_checkpoint_loads_with_zero_missing_keys():
    ckpt = _reference_checkpoint()
    model, report = load_fvlm_checkpoint(ckpt)
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    assert report.harmless_unexpected == ["text_encoder.embeddings.token_type_embeddings.weight"]
    state = ckpt["model"]
    for name in ("temp", "query_tokens", "visual_encoder.blocks.9.attn.qkv.weight", "attention.in_proj_weight",
                 "vision_projs.3.bias", "text_encoder.encoder.layer.11.output.dense.weight"):
        assert torch.equal(model.state_dict()[name], state[name]), name
    assert model.temp.item() == pytest.approx(0.0123)
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    te = model.text_encoder
    assert te.cls.predictions.decoder.weight is te.embeddings.word_embeddings.weight


def _tiny_fvlm_spec():
    return tiny_spec().with_updates(
        text=TextSpec(source="scratch", tokenizer=MINILM_PACKAGE, hidden=32, layers=2, heads=4, intermediate=64,
                      max_position=64, token_type_embeddings=False, mlm_decoder=True)
    )


def test_reference_loader_refuses_a_mismatch_unless_forced():
    spec = _tiny_fvlm_spec()  # the fVLM layout in small sizes: the same mapping, seconds instead of minutes
    state = {k: v.clone() for k, v in build_model(spec).state_dict().items()}
    ckpt = {"model": state, "epoch": 1}
    del state["vision_projs.1.weight"], state["vision_projs.1.bias"], state["query_tokens"]
    state["query_tokens"] = torch.zeros(3, 32)  # a 3-organ model
    state["text_encoder.pooler.dense.weight"] = torch.zeros(32, 32)
    with pytest.raises(CheckpointError, match="missing.*unexpected.*other shapes"):
        load_fvlm_checkpoint(ckpt, spec=spec)
    model, report = load_fvlm_checkpoint(ckpt, spec=spec, strict=False)
    assert sorted(report.missing) == ["vision_projs.1.bias", "vision_projs.1.weight"]
    assert report.unexpected == ["text_encoder.pooler.dense.weight"]
    assert [m[0] for m in report.shape_mismatch] == ["query_tokens"]
    assert torch.equal(model.state_dict()["vision_projs.0.weight"], state["vision_projs.0.weight"])


def test_reference_checkpoint_file_with_ddp_prefix(tmp_path):
    spec = _tiny_fvlm_spec()
    src = build_model(spec)
    path = tmp_path / "fvlm.pth"
    torch.save({"model": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 1}, path)
    model, report = load_fvlm_checkpoint(path, spec=spec)
    assert report.ok
    for k, v in src.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)


def test_own_format_round_trip(tmp_path):
    torch.manual_seed(5)
    spec = tiny_spec().with_updates(thresholds={"liver/cyst": 0.37})
    model = build_model(spec).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, training={"step": 12})
    payload = read_checkpoint(path)
    assert payload["format_version"] == 1 and payload["training"] == {"step": 12}
    assert payload["spec_hash"] == spec.spec_hash()
    loaded, _ = load_checkpoint(path)
    assert loaded.spec == spec and loaded.spec.threshold("liver", "cyst") == 0.37
    assert loaded.spec.findings["spleen"][1].positive == "A hypodense spleen lesion."
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    image = torch.rand(1, 1, 32, 32, 32)
    labels = torch.zeros(1, 32, 32, 32, dtype=torch.long)
    labels[0, 4:20, 4:20, 4:20] = 1
    with torch.no_grad():
        assert torch.equal(model.encode_organs(image, labels)[0], loaded.encode_organs(image, labels)[0])


def test_own_format_leaves_out_a_frozen_package_text_tower(tmp_path):
    spec = tiny_spec().with_updates(text=TextSpec(source=MINILM_PACKAGE, freeze=True, pooling="mean"))
    model = build_model(spec).eval()
    path = save_checkpoint(tmp_path / "m.pt", model)
    payload = read_checkpoint(path)
    assert not any(k.startswith("text_encoder.") for k in payload["state_dict"])
    assert payload["text_fingerprint"]
    assert path.stat().st_size < 2_000_000  # the 90 MB MiniLM is not in it
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.text_proj.weight, model.text_proj.weight)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_texts(["A cyst."]), model.encode_texts(["A cyst."]))


def test_own_format_refuses_foreign_and_damaged_files(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"model": {}}, bad)
    with pytest.raises(CheckpointError, match="not a ct-vlp-checkpoint"):
        read_checkpoint(bad)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        read_checkpoint(tmp_path / "missing.pt")
    model = build_model(tiny_spec())
    path = save_checkpoint(tmp_path / "m.pt", model)
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["vision_projs.1.weight"]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(path)
