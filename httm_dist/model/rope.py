"""2-D rotary position embedding (RoPE) of the aggregator's attention, without parameters.

Each token has a position (y, x): patch (row r, column c) of the grid is at (r + 1, c + 1)
and the special tokens (camera, registers) at (0, 0). The first half of a head's features
rotates with y, the second half with x. Within a half of size D the D/2 frequencies are
``base ** (-2k / D)``; the angles are concatenated with themselves and paired with
``rotate_half(t) = cat(-t2, t1)`` (halves, not interleaved pairs), as in the official VGGT.

The table covers one frame (P tokens). Global attention sees S frames of P tokens with the
same per-frame positions (there is no frame-index encoding), so ``apply`` broadcasts the
frame table over the frames instead of materialising an [S*P, d] table.
"""

from __future__ import annotations

import torch


class RopeTable:
    """Angles for the P tokens of one frame; ``apply`` rotates q or k of shape [..., N, d]."""

    def __init__(
        self,
        grid: tuple[int, int],
        num_special: int,
        head_dim: int,
        base: float,
        device: torch.device,
    ) -> None:
        rows, cols = grid
        half = head_dim // 2
        ys = torch.arange(rows, device=device).repeat_interleave(cols) + 1
        xs = torch.arange(cols, device=device).repeat(rows) + 1
        zeros = torch.zeros(num_special, dtype=ys.dtype, device=device)
        pos = torch.stack([torch.cat([zeros, ys]), torch.cat([zeros, xs])])  # [2, P]
        exponents = torch.arange(0, half, 2, device=device).float() / half
        inv_freq = 1.0 / (base**exponents)  # [half / 2]
        self._angles = pos.float()[..., None] * inv_freq  # [2 (y, x), P, half / 2]
        self.tokens = pos.shape[1]
        self._trig: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def _cos_sin(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, [P, d], computed after casting the angles to ``dtype`` (official)."""
        if dtype not in self._trig:
            a = self._angles.to(dtype)
            a = torch.cat([a, a], dim=-1)  # [2, P, half]
            a = torch.cat([a[0], a[1]], dim=-1)  # [P, d]: y half then x half
            self._trig[dtype] = (a.cos().to(dtype), a.sin().to(dtype))
        return self._trig[dtype]

    def apply(self, t: torch.Tensor) -> torch.Tensor:
        """Rotate ``t`` [..., N, d] where N is a multiple of the frame's P tokens.

        ``t * cos + rotate_half(t) * sin``. Without autograd (inference) it is computed quarter
        by quarter into one output: with ``t = (t1, t2)`` in a (y, x) half, ``(t1 c - t2 s,
        t2 c + t1 s)``, bit for bit the same (``a + (-b)`` is ``a - b`` in IEEE arithmetic and
        the products are the same) without materialising ``-t2`` and the rotated copy: two
        writes of ``t``'s size instead of five, for q and k in every block. Only for fp32, the
        dtype RoPE meets on CPU and, after the fp32 q/k LayerNorm, under CUDA autocast (on CPU
        bf16 the strided quarter writes measured 2.6x slower than the formula); under autograd
        (``out=`` is not differentiable) and for other dtypes the formula runs as written.
        """
        cos, sin = self._cos_sin(t.dtype)
        n = t.shape[-2]
        frames = t.unflatten(-2, (n // self.tokens, self.tokens))  # [..., F, P, d]
        if t.dtype != torch.float32 or (torch.is_grad_enabled() and t.requires_grad):
            return (frames * cos + _rotate_halves(frames) * sin).flatten(-3, -2)
        out = torch.empty_like(frames)
        # [..., 2 (y, x), 2 (t1, t2), D/2] views of the last dimension
        (t1, t2), (o1, o2) = (x.unflatten(-1, (2, 2, -1)).unbind(-2) for x in (frames, out))
        (c1, c2), (s1, s2) = (x.unflatten(-1, (2, 2, -1)).unbind(-2) for x in (cos, sin))
        torch.mul(t1, c1, out=o1).sub_(t2 * s1)
        torch.mul(t2, c2, out=o2).add_(t1 * s2)
        return out.flatten(-3, -2)


def _rotate_halves(t: torch.Tensor) -> torch.Tensor:
    """rotate_half applied to each of the (y, x) halves of the last dimension."""
    t1, t2 = t.unflatten(-1, (2, 2, -1)).unbind(-2)  # [..., half, D/2] each
    return torch.stack([-t2, t1], dim=-2).flatten(-3)
