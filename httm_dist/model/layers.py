"""Transformer building blocks shared by the DINOv2 patch embed, the aggregator and the camera head.

Parameter names (``norm1``, ``attn.qkv``, ``attn.q_norm``, ``ls1.gamma``, ``mlp.fc1`` ...) are
those of the official checkpoint, so its state dict loads unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from httm_dist.model.hooks import AttentionContext, AttentionHook
from httm_dist.model.rope import RopeTable


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch. Its fp32 ``gamma`` keeps the residual stream in
    fp32 under autocast (bf16 branch * fp32 gamma promotes to fp32)."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf) -> fc2."""

    def __init__(self, dim: int, hidden: int, out: Optional[int] = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with optional q/k LayerNorm and 2-D RoPE.

    ``attn_fn`` is the token-merging seam (see ``httm_dist.model.hooks``): when set, it is
    called as ``attn_fn(q, k, v, ctx)`` in place of ``F.scaled_dot_product_attention``, with
    ``q, k, v`` of shape [B, heads, N, head_dim] after q/k norm and RoPE, all in one dtype (the
    dtype the dense kernel would compute in: v's, i.e. the autocast dtype on GPU). Only the
    aggregator's global blocks pass a ``ctx``; setting ``attn_fn`` anywhere else is an error.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.attn_fn: AttentionHook = None

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[RopeTable] = None,
        ctx: Optional[AttentionContext] = None,
    ) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope.apply(q), rope.apply(k)
        # Under autocast LayerNorm returns fp32 while v is bf16; SDPA would cast q and k to the
        # autocast dtype anyway, so casting here changes nothing and gives the hook one dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        if self.attn_fn is None:
            out = F.scaled_dot_product_attention(q, k, v)
        elif ctx is None:
            raise RuntimeError(
                "attn_fn is set on an attention module that is not an aggregator global block; "
                "only model.aggregator.global_blocks[i].attn.attn_fn is supported"
            )
        else:
            out = self.attn_fn(q, k, v, dataclasses.replace(ctx, x=x))
            if out.shape != q.shape:
                raise RuntimeError(
                    f"attn_fn returned shape {tuple(out.shape)} at global layer {ctx.layer_idx}; "
                    f"expected {tuple(q.shape)} (same as q)"
                )
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block: x += ls1(attn(norm1(x))); x += ls2(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        init_values: Optional[float],
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[RopeTable] = None,
        ctx: Optional[AttentionContext] = None,
    ) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope, ctx=ctx))
        return x + self.ls2(self.mlp(self.norm2(x)))
