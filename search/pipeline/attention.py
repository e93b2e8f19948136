"""``torch.nn.MultiheadAttention`` with whole heads removed.

``nn.MultiheadAttention`` ties the width of its heads to the embedding width (``in_proj_weight``
is ``[3 * embed_dim, embed_dim]`` and ``head_dim = embed_dim // num_heads``), so fewer heads on the
same residual stream cannot be expressed in it, and torch-pruning's own support prunes the
embedding width with the heads. ``HeadPrunedAttention`` keeps the embedding width, holds only the
kept heads' q/k/v rows and out-projection columns, and takes the same call as the module it
replaces, so the model's own forward runs unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class HeadPrunedAttention(nn.Module):
    """The kept heads of an ``nn.MultiheadAttention``; same call signature and outputs."""

    kept_heads: torch.Tensor

    def __init__(self, source: nn.MultiheadAttention, kept: Sequence[int]) -> None:
        super().__init__()
        if not source._qkv_same_embed_dim or source.bias_k is not None or source.add_zero_attn:
            raise ValueError("only nn.MultiheadAttention without kdim/vdim, bias_k/bias_v or add_zero_attn")
        embed_dim, heads = source.embed_dim, source.num_heads
        self.head_dim = embed_dim // heads
        self.num_heads = len(kept)
        self.source_heads = heads
        self.register_buffer("kept_heads", torch.tensor(list(kept), dtype=torch.long), persistent=False)
        self.embed_dim = embed_dim
        self.batch_first = source.batch_first
        rows = torch.tensor([h * self.head_dim + j for h in kept for j in range(self.head_dim)], dtype=torch.long)
        in_rows = torch.cat([rows + part * embed_dim for part in range(3)])
        self.in_proj = nn.Linear(embed_dim, 3 * len(rows), bias=source.in_proj_bias is not None)
        self.out_proj = nn.Linear(len(rows), embed_dim, bias=source.out_proj.bias is not None)
        with torch.no_grad():
            self.in_proj.weight.copy_(source.in_proj_weight[in_rows])
            if source.in_proj_bias is not None and self.in_proj.bias is not None:
                self.in_proj.bias.copy_(source.in_proj_bias[in_rows])
            self.out_proj.weight.copy_(source.out_proj.weight[:, rows])
            if source.out_proj.bias is not None and self.out_proj.bias is not None:
                self.out_proj.bias.copy_(source.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, _ = query.shape
        width = self.num_heads * self.head_dim
        weight, bias = self.in_proj.weight, self.in_proj.bias
        q, k, v = (
            nn.functional.linear(x, weight[i * width:(i + 1) * width],
                                 None if bias is None else bias[i * width:(i + 1) * width])
            .view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)
            for i, x in enumerate((query, key, value))
        )
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        # nn.MultiheadAttention's masks: True (or -inf) where attention is not allowed.
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None and attn_mask.dim() == 3:  # one mask per original head
            attn_mask = attn_mask.view(batch, self.source_heads, length, -1).index_select(1, self.kept_heads)
        for mask in (attn_mask, None if key_padding_mask is None else key_padding_mask[:, None, None, :]):
            if mask is None:
                continue
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(mask, float("-inf"))
            else:
                scores = scores + mask
        weights = scores.softmax(dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(batch, length, width)
        out = self.out_proj(out)
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(dim=1) if average_attn_weights else weights
