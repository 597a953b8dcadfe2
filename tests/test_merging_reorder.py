"""Temporal reordering and destination plans: exact, every token once, for ragged shapes."""

import numpy as np
import pytest
import torch

from httm_dist.merging.matching import build_plan
from httm_dist.merging.reorder import build_layout, frame_runs, tile_slices

SHAPES = [
    # S, grid, patch_start_idx, block_spatial, block_frames
    (1, (5, 7), 5, 128, 30),
    (3, (5, 7), 5, 8, 30),  # S < block_frames, tile does not divide the grid
    (7, (4, 4), 5, 6, 3),  # S not a multiple of block_frames
    (6, (3, 13), 0, 10, 2),
    (5, (1, 1), 5, 4, 2),
    (4, (21, 37), 5, 128, 30),  # 294x518
    (2, (9, 5), 5, 1, 1),
    (31, (2, 3), 1, 1000, 30),
]


def _layout(S, grid, psi, bs, bf, protect=True):
    return build_layout(S, psi + grid[0] * grid[1], grid, psi, bs, bf, protect)


@pytest.mark.parametrize("protect", [True, False])
@pytest.mark.parametrize("S,grid,psi,bs,bf", SHAPES)
def test_reorder_is_an_exact_permutation(S, grid, psi, bs, bf, protect):
    lay = _layout(S, grid, psi, bs, bf, protect)
    N = S * (psi + grid[0] * grid[1])
    assert np.array_equal(np.sort(lay.perm), np.arange(N))
    blocked = lay.blocks[lay.blocks >= 0]
    assert np.array_equal(np.sort(np.concatenate([lay.protected, blocked])), np.arange(N))
    x = torch.randn(2, 3, N, 4)
    y = lay.reorder(x)
    assert torch.equal(lay.restore(y), x)
    assert torch.equal(y, x[:, :, torch.as_tensor(lay.perm)])


@pytest.mark.parametrize("S,grid,psi,bs,bf", SHAPES)
def test_blocks_are_one_tile_of_one_run(S, grid, psi, bs, bf):
    lay = _layout(S, grid, psi, bs, bf)
    P = psi + grid[0] * grid[1]
    for blk in lay.blocks:
        valid = blk >= 0
        frames, offsets = blk // P, blk % P
        rows = [set(frames[f][valid[f]]) for f in range(blk.shape[0]) if valid[f].any()]
        assert all(len(r) == 1 for r in rows)  # one frame per row
        fr = sorted(r.pop() for r in rows)
        assert fr == list(range(fr[0], fr[0] + len(fr))) and len(fr) <= bf  # consecutive run
        tile = [set(offsets[f][valid[f]]) for f in range(blk.shape[0]) if valid[f].any()]
        assert all(t == tile[0] for t in tile)  # the same tile in every frame
        assert all(o >= psi for o in tile[0])  # protected tokens are in no block


@pytest.mark.parametrize("rows,cols,bs", [(37, 37, 128), (21, 37, 128), (5, 7, 8), (1, 9, 4), (9, 1, 4), (3, 3, 100)])
def test_tiles_cover_the_grid_once_and_have_about_block_spatial_patches(rows, cols, bs):
    cover = np.zeros((rows, cols), dtype=int)
    sizes = []
    for r0, r1, c0, c1 in tile_slices(rows, cols, bs):
        cover[r0:r1, c0:c1] += 1
        sizes.append((r1 - r0) * (c1 - c0))
    assert (cover == 1).all()
    assert max(sizes) <= max(2 * bs, 2) and (max(sizes) >= bs / 2 or max(sizes) == rows * cols)


def test_frame_runs_last_run_shorter():
    assert frame_runs(65, 30) == [(0, 30), (30, 60), (60, 65)]
    assert frame_runs(1, 30) == [(0, 1)]


@pytest.mark.parametrize("anchor", [True, False])
@pytest.mark.parametrize("S,grid,psi,bs,bf", SHAPES)
@pytest.mark.parametrize("frac", [0.1, 0.3, 1.0])
def test_plan_partitions_tokens_into_kept_and_src(S, grid, psi, bs, bf, frac, anchor):
    lay = _layout(S, grid, psi, bs, bf)
    P = psi + grid[0] * grid[1]
    plan = build_plan(lay, frac, anchor, torch.device("cpu"))
    kept, src = plan.kept.numpy(), plan.src_tokens.numpy()
    assert np.array_equal(np.sort(np.concatenate([kept, src])), np.arange(S * P))  # each once
    assert np.array_equal(plan.slot_of.numpy()[kept], np.arange(kept.size))
    assert (plan.slot_of.numpy()[src] == -1).all()
    assert set(lay.protected) <= set(kept)
    if frac == 1.0:
        assert src.size == 0
    if anchor:
        assert set(range(P)) <= set(kept)  # frame 0 is kept entirely
    # every src's block offers dst in the same tile: same in-frame offset set
    src_idx, sel = plan.src_idx.numpy(), plan.src_sel.numpy()
    dst_idx, valid = plan.dst_idx.numpy(), plan.dst_valid.numpy()
    blk_of_src = sel // src_idx.shape[1]
    for b in np.unique(blk_of_src):
        d = dst_idx[b][valid[b]]
        assert set(d) <= set(kept)
        assert set(src_idx[b].ravel()[sel[blk_of_src == b] % src_idx.shape[1]] % P) <= set(lay.blocks[b][lay.blocks[b] >= 0] % P)
        if anchor and lay.run_frames[b // lay.num_tiles][0] != 0:
            assert set(lay.blocks[b][lay.blocks[b] >= 0] % P) <= set(d[d < P])  # frame-0 tile


def test_dst_are_strided_whole_frames():
    lay = _layout(30, (4, 4), 5, 16, 30)
    plan = build_plan(lay, 0.1, True, torch.device("cpu"))
    kept_patches = plan.kept.numpy()
    kept_patches = kept_patches[kept_patches % 21 >= 5]
    assert sorted(set(kept_patches // 21)) == [0, 10, 20]
    assert kept_patches.size == 3 * 16
