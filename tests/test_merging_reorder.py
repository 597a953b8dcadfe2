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
def test_blocks_and_protected_tokens_hold_every_token_once(S, grid, psi, bs, bf, protect):
    lay = _layout(S, grid, psi, bs, bf, protect)
    N = S * (psi + grid[0] * grid[1])
    blocked = lay.blocks[lay.blocks >= 0]
    assert np.array_equal(np.sort(np.concatenate([lay.protected, blocked])), np.arange(N))


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


@pytest.mark.parametrize("rows,cols,bs", [(37, 37, 128), (21, 37, 128), (5, 7, 8), (1, 9, 4), (9, 1, 4), (3, 3, 100), (40, 1, 128), (400, 1, 128)])
def test_tiles_cover_the_grid_once_and_have_about_block_spatial_patches(rows, cols, bs):
    cover = np.zeros((rows, cols), dtype=int)
    sizes = []
    for r0, r1, c0, c1 in tile_slices(rows, cols, bs):
        cover[r0:r1, c0:c1] += 1
        sizes.append((r1 - r0) * (c1 - c0))
    assert (cover == 1).all()
    assert max(sizes) <= max(2 * bs, 2) and (np.mean(sizes) >= bs / 2 or len(sizes) == 1)
    if (rows, cols, bs) == (21, 37, 128):  # 294x518 frames: 2 x 3 tiles of up to 11 x 13
        assert len(sizes) == 6 and max(sizes) == 143


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
    tile_of = np.full(P, -1)
    for i, row in enumerate(lay.tile_offsets):
        tile_of[row[row >= 0]] = i
    for g in plan.groups:  # each block: src and dst from one tile, dst in its run (or frame 0)
        src_idx, valid_s = g.src_idx.numpy(), np.zeros(g.src_idx.numel(), bool)
        valid_s[g.src_sel.numpy()] = True
        valid_s = valid_s.reshape(src_idx.shape)
        for srow, vs, drow, vd in zip(src_idx, valid_s, g.dst_idx.numpy(), g.dst_valid.numpy()):
            src, dst = srow[vs], drow[vd]
            if not src.size:
                continue
            assert set(dst) <= set(kept)
            assert len(set(tile_of[np.concatenate([src, dst]) % P])) == 1
            frames = set(src // P) | set(dst // P)
            run = sorted(frames - ({0} if anchor else set()) or {0})
            assert run[-1] - run[0] < bf
            if anchor and 0 not in set(src // P):
                tile = lay.tile_offsets[tile_of[src[0] % P]]
                assert set(tile[tile >= 0]) <= set(dst[dst < P])  # frame 0's tile is a dst


def test_dst_are_strided_whole_frames():
    lay = _layout(30, (4, 4), 5, 16, 30)
    plan = build_plan(lay, 0.1, True, torch.device("cpu"))
    kept_patches = plan.kept.numpy()
    kept_patches = kept_patches[kept_patches % 21 >= 5]
    assert sorted(set(kept_patches // 21)) == [0, 10, 20]
    assert kept_patches.size == 3 * 16
