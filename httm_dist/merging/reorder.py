"""Temporal reordering: group the tokens of a global block into merging blocks.

A global block sees ``S`` frames of ``P = patch_start_idx + rows * cols`` tokens, frame-major.
HTTM matches tokens inside *merging blocks*: one spatial tile of the patch grid (about
``block_spatial`` patches, shaped like the grid) taken from one run of up to ``block_frames``
consecutive frames, so that a token sits next to its counterparts in neighbouring frames.

DECISIONS D2 and D6 (docs/HTTM.md): tiles are 2-D, about ``block_spatial`` patches shaped like the grid
(edge tiles smaller, never dropped, see ``tile_slices``); frames are cut into runs of
``block_frames`` (the last run shorter).
Protected special tokens (camera, registers) belong to no block; unprotected ones form one
extra "tile" of ``patch_start_idx`` tokens per frame.

The layout is static for a given sequence shape and config, so it is built once (plain Python
over tiles and runs, not in the hot path) and cached by the strategies, which gather tokens by
``blocks`` directly: the protected tokens and the blocks together hold every token exactly
once, and unmerging by token index restores the original order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def round_half_up(x: float) -> int:
    """Round to nearest, halves up (Python's ``round`` rounds halves to even)."""
    return int(math.floor(x + 0.5))


def tile_slices(rows: int, cols: int, block_spatial: int) -> list[tuple[int, int, int, int]]:
    """Cut a ``rows x cols`` patch grid into 2-D tiles of about ``block_spatial`` patches.

    ``round(rows * cols / block_spatial)`` tiles (at least 1), laid out ``n_r x n_c`` with the
    grid's aspect ratio; tile sides are ``ceil(rows / n_r) x ceil(cols / n_c)``, so edge tiles
    are smaller and waste little (21 x 37 at 128 -> 2 x 3 tiles of up to 11 x 13). Returns
    ``(row_start, row_stop, col_start, col_stop)`` per tile, row-major; every patch is in
    exactly one tile.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"patch_grid: {(rows, cols)} must have at least one row and one column")
    n_tiles = max(1, round_half_up(rows * cols / block_spatial))
    n_r = min(rows, n_tiles, max(1, round_half_up(math.sqrt(n_tiles * rows / cols))))
    n_c = min(cols, max(1, round_half_up(n_tiles / n_r)))
    tile_rows, tile_cols = math.ceil(rows / n_r), math.ceil(cols / n_c)
    return [
        (r, min(r + tile_rows, rows), c, min(c + tile_cols, cols))
        for r in range(0, rows, tile_rows)
        for c in range(0, cols, tile_cols)
    ]


def frame_runs(num_frames: int, block_frames: int) -> list[tuple[int, int]]:
    """Runs of ``block_frames`` consecutive frames, the last one shorter: ``(start, stop)``."""
    return [(s, min(s + block_frames, num_frames)) for s in range(0, num_frames, block_frames)]


def pad_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Rows stacked into one ``int64`` array, padded to the longest with -1."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@dataclass(frozen=True)
class BlockLayout:
    """The merging blocks of one sequence shape.

    ``blocks[b, f, t]`` is the global (frame-major) index of token ``t`` of the tile in frame
    ``f`` of the run of block ``b``, or -1 for padding (edge tiles, the last run). Block ``b`` is
    run ``b // num_tiles``, tile ``b % num_tiles``. ``run_frames[r]`` lists the frames of run
    ``r`` (-1 padded) and ``tile_offsets[t]`` the in-frame token offsets of tile ``t``.
    """

    num_frames: int
    tokens_per_frame: int
    blocks: np.ndarray
    run_frames: np.ndarray
    tile_offsets: np.ndarray
    protected: np.ndarray

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame

    @property
    def num_tiles(self) -> int:
        return self.tile_offsets.shape[0]


def build_layout(
    num_frames: int,
    tokens_per_frame: int,
    patch_grid: tuple[int, int],
    patch_start_idx: int,
    block_spatial: int,
    block_frames: int,
    protect_special_tokens: bool = True,
) -> BlockLayout:
    """The :class:`BlockLayout` for ``num_frames`` frames of ``tokens_per_frame`` tokens."""
    rows, cols = patch_grid
    if num_frames < 1:
        raise ValueError(f"num_frames: {num_frames} must be >= 1")
    if tokens_per_frame != patch_start_idx + rows * cols:
        raise ValueError(
            f"tokens_per_frame: {tokens_per_frame} != patch_start_idx {patch_start_idx} + "
            f"rows*cols {rows}*{cols}; the attention context does not describe this sequence"
        )
    grid = patch_start_idx + np.arange(rows * cols, dtype=np.int64).reshape(rows, cols)
    tiles = [grid[r0:r1, c0:c1].ravel() for r0, r1, c0, c1 in tile_slices(rows, cols, block_spatial)]
    frames = np.arange(num_frames, dtype=np.int64)
    special = np.arange(patch_start_idx, dtype=np.int64)
    if protect_special_tokens or patch_start_idx == 0:
        protected = (frames[:, None] * tokens_per_frame + special[None, :]).ravel()
    else:
        tiles.insert(0, special)
        protected = np.zeros(0, dtype=np.int64)
    tile_offsets = pad_rows(tiles)
    run_frames = pad_rows([frames[a:b] for a, b in frame_runs(num_frames, block_frames)])

    blocks = run_frames[:, None, :, None] * tokens_per_frame + tile_offsets[None, :, None, :]
    pad = (run_frames[:, None, :, None] < 0) | (tile_offsets[None, :, None, :] < 0)
    blocks = np.where(pad, -1, blocks).reshape(-1, run_frames.shape[1], tile_offsets.shape[1])
    return BlockLayout(num_frames, tokens_per_frame, blocks, run_frames, tile_offsets, protected)
