"""Pooling heads: how the tokens of one organ become one vector.

- ``fvlm_query`` (fVLM): the organ's learnable query attends, through one shared multi-head
  attention, over only the tokens inside the organ's max-pooled mask, from several encoder depths.
- ``ctglip_mask_avg`` (CT-GLIP): average of the tokens weighted by the fraction of each patch
  that the organ fills.
- ``radclip_slice`` (RadCLIP): slices encoded one by one in 2D; self-attention over the slice
  embeddings that contain the organ, plus a learned slice-position encoding, pooled to one vector.

Every head sees only what lies inside its organ (tokens, or slices for RadCLIP), so changing
what the encoder outputs elsewhere cannot change that organ's embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def organ_token_mask(mask: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """Tokens touched by an organ: ``max_pool(mask, kernel=stride=patch) > 0``, flattened (L,)."""
    pool = F.max_pool3d if mask.dim() == 3 else F.max_pool2d
    return pool(mask[None, None].float(), kernel_size=patch, stride=patch).flatten() > 0


def organ_core_mask(mask: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """Patches wholly inside an organ: ``min_pool(mask, kernel=stride=patch) > 0``, flattened (L,)."""
    pool = F.max_pool3d if mask.dim() == 3 else F.max_pool2d
    return pool(-(mask[None, None].float()), kernel_size=patch, stride=patch).flatten() < 0


def organ_token_weights(mask: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """Fraction of each patch filled by an organ, flattened (L,)."""
    pool = F.avg_pool3d if mask.dim() == 3 else F.avg_pool2d
    return pool(mask[None, None].float(), kernel_size=patch, stride=patch).flatten()


def query_pool(
    query: torch.Tensor, attention: nn.MultiheadAttention, levels: list[torch.Tensor], tokens: torch.Tensor
) -> torch.Tensor:
    """fVLM: one query (C,) attends over the selected tokens of every level (each L x C) -> (C,)."""
    kv = torch.cat([level[tokens] for level in levels], dim=0).unsqueeze(0)
    out, _ = attention(query.view(1, 1, -1), kv, kv, need_weights=False)
    return out[0, 0]


def mask_average_pool(levels: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """CT-GLIP: mask-weighted average of the tokens of every level (each L x C) -> (C,)."""
    keep = weights > 0
    w = weights[keep] / weights[keep].sum()
    return torch.stack([(level[keep] * w[:, None]).sum(0) for level in levels]).mean(0)


class SlicePooling(nn.Module):
    """RadCLIP: self-attention over slice embeddings plus slice-position encoding, mean-pooled."""

    def __init__(self, hidden: int, heads: int, max_slices: int, dropout: float) -> None:
        super().__init__()
        self.slice_position = nn.Parameter(torch.zeros(max_slices, hidden))
        nn.init.trunc_normal_(self.slice_position, std=0.02)
        self.norm = nn.LayerNorm(hidden)
        self.attention = nn.MultiheadAttention(hidden, heads, dropout=dropout, batch_first=True)

    def forward(self, slice_embeds: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Pool the slices (S x C) flagged in ``present`` (S,) into one vector (C,)."""
        if slice_embeds.shape[0] > self.slice_position.shape[0]:
            raise ValueError(
                f"{slice_embeds.shape[0]} slices exceed pooling.max_slices={self.slice_position.shape[0]}; "
                "raise it in the spec or use a smaller window"
            )
        index = torch.nonzero(present).flatten()
        x = self.norm(slice_embeds[index] + self.slice_position[index]).unsqueeze(0)
        y, _ = self.attention(x, x, x, need_weights=False)
        return (x + y)[0].mean(0)
