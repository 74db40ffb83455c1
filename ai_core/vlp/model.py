"""The organ-level VLP model (fVLM design), built with every size taken from a ``ModelSpec``.

Parameter names follow the fVLM reference checkpoint (BlipPretrain): ``temp``, ``query_tokens``,
``visual_encoder.*`` (MONAI ViT), ``text_encoder.*`` (BERT), ``text_proj``, ``attention``,
``vision_projs.N``; so a reference checkpoint loads by name (``ai_core.vlp.checkpoint``).

Inference arithmetic, as in the reference evaluation: ViT over the window (position embedding
interpolated trilinearly for grids other than the trained one); per organ, the tokens where
``max_pool3d(mask, patch) > 0`` from blocks ``taps`` and the final normed output are the keys and
values of one shared ``nn.MultiheadAttention`` queried by the organ's row of ``query_tokens``;
then the organ's ``vision_projs`` and L2 normalisation. Text: CLS state -> ``text_proj`` -> L2.
Similarity = (image . text) / temp with ``temp`` used as stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import ViT
from torch import nn

from ai_core.vlp.pooling import (
    SlicePooling,
    mask_average_pool,
    organ_core_mask,
    organ_token_mask,
    organ_token_weights,
    query_pool,
)
from ai_core.vlp.spec import ModelSpec
from ai_core.vlp.text import build_text_encoder, load_tokenizer, pool_text


def gaussian_blur(x: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, C, D, H, W) along D, H, W (sigmas in voxels; zeros outside)."""
    c = x.shape[1]
    for axis, sigma in enumerate(sigmas):
        r = max(1, math.ceil(3 * sigma))
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = -1
        pad = [0, 0, 0]
        pad[axis] = r
        x = F.conv3d(x, (k / k.sum()).reshape(shape).repeat(c, 1, 1, 1, 1), padding=tuple(pad), groups=c)
    return x


class VisionTransformer(ViT):
    """MONAI's ViT returning the tapped block outputs and the normed output, any input grid."""

    def __init__(
        self,
        img_size: Sequence[int],
        patch_size: Sequence[int],
        hidden: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        taps: Sequence[int],
        qkv_bias: bool = True,
        dropout: float = 0.0,
        in_channels: int = 1,
        stem: Sequence[int] = (),
    ) -> None:
        scale = 2 ** len(stem)
        super().__init__(
            in_channels=stem[-1] if stem else in_channels,
            img_size=tuple(i // scale for i in img_size),
            patch_size=tuple(p // scale for p in patch_size),
            hidden_size=hidden,
            mlp_dim=mlp_dim,
            num_layers=depth,
            num_heads=heads,
            proj_type="conv",
            pos_embed_type="learnable",
            classification=False,
            dropout_rate=dropout,
            spatial_dims=len(img_size),
            qkv_bias=qkv_bias,
        )
        # Unused without cross-attention, and absent from the fVLM layout: drop it so the
        # state_dict is exactly the reference one.
        for block in self.blocks:
            del block.norm_cross_attn
        if stem:
            conv = nn.Conv3d if len(img_size) == 3 else nn.Conv2d
            layers: list[nn.Module] = []
            for c_in, c_out in zip((in_channels, *stem[:-1]), stem):
                layers += [conv(c_in, c_out, kernel_size=2, stride=2), nn.GELU()]
            self.stem = nn.Sequential(*layers)
            for layer in self.stem:
                if isinstance(layer, (nn.Conv2d, nn.Conv3d)):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    nn.init.zeros_(layer.bias)
        # As MAE initialises its patch embedding: PyTorch's default conv init with its bias leaves
        # the image content far below the bias after a stem, and every token alike.
        conv = self.patch_embedding.patch_embeddings
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        self.trained_grid = tuple(i // p for i, p in zip(img_size, patch_size))
        self.patch = tuple(patch_size)
        self.taps = tuple(taps)

    def position_embeddings(self, grid: Sequence[int]) -> torch.Tensor:
        """Position embedding (1, L, C) for a token grid; interpolated when not the trained grid."""
        pe = self.patch_embedding.position_embeddings
        if tuple(grid) == self.trained_grid:
            return pe
        mode = "trilinear" if len(grid) == 3 else "bilinear"
        pe = pe.permute(0, 2, 1).reshape(1, pe.shape[-1], *self.trained_grid)
        pe = F.interpolate(pe, size=tuple(grid), mode=mode, align_corners=False)
        return pe.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[override]
        """Tokens (B, L, C) after the final norm, and the levels [tap outputs..., normed output]."""
        if any(s % p for s, p in zip(x.shape[2:], self.patch)):
            raise ValueError(f"input size {tuple(x.shape[2:])} is not a multiple of the patch size {self.patch}")
        if hasattr(self, "stem"):
            x = self.stem(x)
        x = self.patch_embedding.patch_embeddings(x)
        grid = x.shape[2:]
        x = x.flatten(2).transpose(-1, -2)
        x = self.patch_embedding.dropout(x + self.position_embeddings(grid))
        levels = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                levels.append(x)
        x = self.norm(x)
        levels.append(x)
        return x, levels


class Levels(list):
    """The encoder's token levels, and the focal map (B, C, D/2, H/2, W/2) when the spec has one.

    ``focal_clear`` (B, D/2 * H/2 * W/2): the focal map's voxels whose 2x2x2 block has no voxel
    below ``vision.focal_floor_hu``, when the spec sets it.
    """

    focal: torch.Tensor | None = None
    focal_clear: torch.Tensor | None = None


class OrganVLP(nn.Module):
    """fVLM-style organ-level image-text model; see the module docstring."""

    def __init__(self, spec: ModelSpec, load_text_weights: bool = True) -> None:
        super().__init__()
        self.spec = spec
        v, p = spec.vision, spec.pooling
        n_organs = len(spec.organs)
        self.temp = nn.Parameter(torch.tensor(float(spec.temperature_init)))
        if p.kind == "fvlm_query":
            self.query_tokens = nn.Parameter(torch.zeros(n_organs, v.hidden))
            nn.init.trunc_normal_(self.query_tokens, std=0.02)
        if p.kind == "radclip_slice":
            # One 2D encoder applied to every slice (H, W) of the window.
            self.visual_encoder = VisionTransformer(
                v.window[1:], p.slice_patch, v.hidden, v.depth, v.heads, v.mlp_dim, (), v.qkv_bias, v.dropout,
                v.encoder_channels, v.stem,
            )
        else:
            self.visual_encoder = VisionTransformer(
                v.window, v.patch, v.hidden, v.depth, v.heads, v.mlp_dim, v.taps, v.qkv_bias, v.dropout,
                v.encoder_channels, v.stem,
            )
        self.text_encoder = build_text_encoder(spec.text, load_weights=load_text_weights)
        if spec.text.freeze:
            self.text_encoder.requires_grad_(False)
        self.text_proj = nn.Linear(spec.text.hidden, spec.embed_dim)
        if p.kind == "fvlm_query":
            self.attention = nn.MultiheadAttention(v.hidden, p.heads, dropout=p.dropout, batch_first=True)
        if p.kind == "radclip_slice":
            self.slice_pooling = SlicePooling(v.hidden, p.heads, p.max_slices, p.dropout)
        if v.focal:
            if p.kind == "radclip_slice":
                raise ValueError("vision.focal works with the 3D pooling heads, not radclip_slice")
            layers: list[nn.Module] = [nn.Conv3d(v.encoder_channels, v.focal[0], kernel_size=2, stride=2)]
            for c_in, c_out in zip(v.focal[:-1], v.focal[1:]):
                layers += [nn.GELU(), nn.Conv3d(c_in, c_out, kernel_size=3, padding=1)]
            self.focal_encoder = nn.Sequential(*layers)  # linear last layer: its minimum means something
        pooled = v.hidden + (2 * v.focal[-1] if v.focal else 0)
        if p.batch_norm:
            self.vision_norms = nn.ModuleList(nn.BatchNorm1d(pooled, affine=False) for _ in range(n_organs))
        self.vision_projs = nn.ModuleList(nn.Linear(pooled, spec.embed_dim) for _ in range(n_organs))
        for proj in (self.text_proj, *self.vision_projs):
            nn.init.zeros_(proj.bias)  # start without a shared offset that hides the content
        self._tokenizer = None
        self.collect_norm_stats = False  # set by training to re-estimate vision_norms statistics

    # -- image side ----------------------------------------------------------------------------

    def input_channels(self, image: torch.Tensor) -> torch.Tensor:
        """The spec's HU windows as channels of a 0..1 input scaled from ``preprocess.hu_window``."""
        windows = self.spec.vision.input_windows
        if not windows:
            return image
        lo, hi = self.spec.preprocess.hu_window
        hu = image * (hi - lo) + lo
        return torch.cat([((hu - a) / (b - a)).clamp(0.0, 1.0) for a, b in windows], dim=1)

    def relative_contrast(self, image: torch.Tensor, organ_mask: torch.Tensor,
                          scales_hu: Sequence[float] | None = None) -> torch.Tensor:
        """(B, S, D, H, W): (HU - the organ's median HU) / scale in -1..1 inside the mask, 0 outside.

        One channel per scale of ``scales_hu`` (default: ``vision.relative_scale_hu`` alone).
        """
        scales = [self.spec.vision.relative_scale_hu] if scales_hu is None else list(scales_hu)
        lo, hi = self.spec.preprocess.hu_window
        hu = image[:, 0] * (hi - lo) + lo
        mask = organ_mask.bool()
        out = torch.zeros((hu.shape[0], len(scales), *hu.shape[1:]), dtype=hu.dtype, device=hu.device)
        for b in range(hu.shape[0]):
            if bool(mask[b].any()):
                diff = hu[b] - hu[b][mask[b]].median()
                for i, s in enumerate(scales):
                    out[b, i] = (diff / s).clamp(-1.0, 1.0) * mask[b]
        return out

    def lesion_scale_contrast(self, relative: torch.Tensor, organ_mask: torch.Tensor) -> torch.Tensor:
        """(B, S, D, H, W): the relative contrast (B, 1, D, H, W) averaged inside the organ at each lesion scale."""
        m = organ_mask.to(relative.dtype).unsqueeze(1)
        # preprocess.spacing_mm is (x, y, z); the window's axes are (D, H, W) = (z, y, x).
        spacing = tuple(reversed(self.spec.preprocess.spacing_mm))
        out = []
        for sigma_mm in self.spec.vision.lesion_scales_mm:
            sigmas = [sigma_mm / sp for sp in spacing]
            both = gaussian_blur(torch.cat([relative * m, m], dim=1), sigmas)
            out.append(both[:, :1] / both[:, 1:].clamp_min(1e-3) * m)
        return torch.cat(out, dim=1)

    def image_levels(self, image: torch.Tensor, organ_mask: torch.Tensor | None = None) -> Levels:
        """Encoder outputs used as pooling keys: 3D heads (B, L, C) per level; RadCLIP [(B, D, C)].

        With ``vision.mask_channel`` the encoder also needs the mask (B, D, H, W) of the organ asked
        about. With ``vision.focal`` the result also carries the focal map (B, C, D/2, H/2, W/2).
        """
        scaled = image
        image = self.input_channels(image)
        if self.spec.vision.mask_channel:
            if organ_mask is None:
                raise ValueError("this model's encoder needs the organ mask (vision.mask_channel)")
            m = organ_mask.to(image.dtype).unsqueeze(1)
            image = torch.cat([image, image * m, m], dim=1)
            if self.spec.vision.relative_channel:
                v = self.spec.vision
                # one median per organ for every scale; the wider scales go last (see VisionSpec)
                contrasts = self.relative_contrast(scaled, organ_mask, (v.relative_scale_hu, *v.relative_extra_scales_hu))
                relative = contrasts[:, :1]
                image = torch.cat([image, relative], dim=1)
                if v.lesion_scales_mm:
                    image = torch.cat([image, self.lesion_scale_contrast(relative, organ_mask)], dim=1)
                if v.relative_extra_scales_hu:
                    image = torch.cat([image, contrasts[:, 1:]], dim=1)
        if self.spec.pooling.kind == "radclip_slice":
            b, c, d, h, w = image.shape
            tokens, _ = self.visual_encoder(image.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w))
            return Levels([tokens.mean(1).reshape(b, d, -1)])
        _, levels = self.visual_encoder(image)
        out = Levels(levels)
        if hasattr(self, "focal_encoder"):
            out.focal = self.focal_encoder(image)
            if self.spec.vision.focal_floor_hu is not None:
                lo, hi = self.spec.preprocess.hu_window
                block_min = -F.max_pool3d(-(scaled[:, :1] * (hi - lo) + lo), kernel_size=2, stride=2)
                out.focal_clear = (block_min >= self.spec.vision.focal_floor_hu).flatten(1)
        return out

    def pool_organ(self, levels: Levels, b: int, organ: int, mask: torch.Tensor) -> torch.Tensor:
        """Pooled (C,) feature of one organ (query index) of batch item ``b`` from its mask (D, H, W).

        With ``vision.focal``, C is the hidden size plus twice the focal path's last width.
        """
        kind = self.spec.pooling.kind
        if kind == "fvlm_query":
            tokens = organ_token_mask(mask, self.spec.vision.patch)
            pooled = query_pool(self.query_tokens[organ], self.attention, [lv[b] for lv in levels], tokens)
            if self.spec.pooling.token_max:
                pooled = pooled + torch.cat([lv[b][tokens] for lv in levels]).amax(0)
            return self._add_focal(pooled, levels, b, mask)
        if kind == "ctglip_mask_avg":
            weights = organ_token_weights(mask, self.spec.vision.patch)
            return self._add_focal(mask_average_pool([lv[b] for lv in levels], weights), levels, b, mask)
        present = mask.flatten(1).any(1)
        return self.slice_pooling(levels[0][b], present)

    def _add_focal(self, pooled: torch.Tensor, levels: Levels, b: int, mask: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "focal_encoder"):
            return pooled
        if levels.focal is None:
            raise ValueError("this model has a focal path (vision.focal): pass the levels image_levels returned")
        fmap = levels.focal[b].flatten(1)  # (C, voxels at half resolution)
        touched = organ_token_mask(mask, (2, 2, 2))
        core = organ_core_mask(mask, (2, 2, 2))
        if levels.focal_clear is not None:
            clear = core & levels.focal_clear[b]
            if bool(clear.any()):  # else the whole core: the organ may be fat itself (a lipoma)
                core = clear
        if not bool(core.any()):  # an organ too thin to have a core: its whole extent
            core = touched
        # A bright spot (stone) raises a maximum anywhere in the organ; a dark one (cyst, lesion)
        # lowers a minimum in its core, where the organ's own border (partial volume with the fat
        # around it) cannot look like one. Their own channels, not added to the tokens' ones:
        # standardised apart (batch_norm), a few voxels are not drowned by the whole organ's look.
        return torch.cat([pooled, fmap[:, touched].amax(1), fmap[:, core].amin(1)])

    def project_image(self, pooled: torch.Tensor, organ: int) -> torch.Tensor:
        """Organ projection and L2 normalisation of pooled features (C,) or (N, C) of one organ."""
        if hasattr(self, "vision_norms"):
            norm = self.vision_norms[organ]
            x = pooled.reshape(-1, pooled.shape[-1])
            # a single window in training has no batch statistics: use the running ones
            batch_stats = (self.training or self.collect_norm_stats) and x.shape[0] > 1
            momentum = norm.momentum
            if batch_stats:
                norm.num_batches_tracked.add_(1)
                if momentum is None:  # cumulative average, as nn.BatchNorm1d does
                    momentum = 1.0 / float(norm.num_batches_tracked)
            x = F.batch_norm(x, norm.running_mean, norm.running_var, training=batch_stats,
                             momentum=momentum or 0.0, eps=norm.eps)
            pooled = x.reshape(pooled.shape)
        return F.normalize(self.vision_projs[organ](pooled), dim=-1)

    def encode_organs(
        self, image: torch.Tensor, label_map: torch.Tensor, organs: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, K, E) of organs (query indices; default all) and a validity flag (B, K).

        ``image`` is (B, C, D, H, W), ``label_map`` (B, D, H, W) with organ ``i`` labelled ``i + 1``.
        An organ absent from a window gets a zero row and ``valid = False``.
        """
        organs = list(range(len(self.spec.organs))) if organs is None else list(organs)
        per_organ = self.spec.vision.mask_channel
        levels = None if per_organ else self.image_levels(image)
        out = image.new_zeros(image.shape[0], len(organs), self.spec.embed_dim)
        valid = torch.zeros(image.shape[0], len(organs), dtype=torch.bool, device=image.device)
        for b in range(image.shape[0]):
            for k, organ in enumerate(organs):
                mask = label_map[b] == organ + 1
                if not bool(mask.any()):
                    continue
                if per_organ:
                    lv = self.image_levels(image[b : b + 1], mask[None])
                    pooled = self.pool_organ(lv, 0, organ, mask)
                else:
                    pooled = self.pool_organ(levels, b, organ, mask)
                out[b, k] = self.project_image(pooled, organ)
                valid[b, k] = True
        return out, valid

    # -- text side -----------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """The tokenizer of the text tower (loaded lazily from local files)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.spec.text)
        return self._tokenizer

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask as the spec pads and truncates them."""
        t = self.spec.text
        enc = self.tokenizer(
            list(texts), padding=t.padding, truncation=True, max_length=t.max_length, return_tensors="pt"
        )
        device = self.text_proj.weight.device
        return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}

    def text_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled text-encoder state (N, hidden), before the projection."""
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask)
        return pool_text(out.last_hidden_state, attention_mask, self.spec.text.pooling)

    def project_text(self, hidden: torch.Tensor) -> torch.Tensor:
        """Text projection and L2 normalisation."""
        return F.normalize(self.text_proj(hidden), dim=-1)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Normalised text embeddings (N, E) from token ids."""
        return self.project_text(self.text_hidden(input_ids, attention_mask))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised text embeddings (N, E) of sentences."""
        return self.encode_text(**self.tokenize(texts))

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """(image . text) / temp, with ``temp`` used as stored (reference inference)."""
        return image_embeds @ text_embeds.t() / self.temp


def build_model(spec: ModelSpec, load_text_weights: bool = True) -> OrganVLP:
    """The model a spec describes, randomly initialised except for a pre-trained text tower."""
    return OrganVLP(spec, load_text_weights=load_text_weights)
