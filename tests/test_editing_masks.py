"""Known-token masks through the pyramid's own restriction (msar.editing): the kept fraction
of every token's support, on grids and on a non-grid cluster hierarchy, and what the
threshold does to the decoded edit."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import msar
from msar.editing import grid_known_masks, known_masks
from msar.testing import random_schedules, tiny_transformer
from test_conformance import SPHERE, sphere_assignments, sphere_pyramid, sphere_tokenizer, sphere_data


def area_window_fraction(keep: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Independent reference: the kept fraction of the adaptive-average-pooling window of every
    cell of ``shape`` (window i of n over N: [floor(i N / n), ceil((i + 1) N / n)))."""
    B, full = keep.shape[0], keep.shape[1:]
    out = torch.empty(B, *shape)
    for cell in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist():
        win = tuple(slice(i * N // n, math.ceil((i + 1) * N / n)) for i, n, N in zip(cell, shape, full))
        out[(slice(None), *cell)] = keep[(slice(None), *win)].float().flatten(1).mean(1)
    return out.flatten(1)


@settings(max_examples=25, deadline=None)
@given(random_schedules(kinds=("grid",), ranks=(1, 2), max_scales=4, max_side=9, max_tokens=64),
       st.floats(0.05, 1.0), st.integers(0, 2 ** 16))
def test_grid_masks_are_the_kept_fraction_of_each_area_window(schedule, threshold, seed):
    """Bug caught: a mask that tests the token's centre (or any cell) instead of the kept
    fraction of its whole pooling window; or grid and generic paths that disagree."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(2, *schedule.shape(-1), generator=g) < 0.6
    masks = known_masks(msar.GridPyramid(schedule), keep, threshold)
    assert all(torch.equal(a, b) for a, b in zip(masks, grid_known_masks(schedule, keep, threshold)))
    for k, m in enumerate(masks):
        want = area_window_fraction(keep, schedule.shape(k)) >= threshold - 1e-6
        assert m.dtype == torch.bool and torch.equal(m, want), (k, m, want)


def test_cluster_masks_follow_the_hierarchy():
    """On the cube-sphere: threshold 1 keeps exactly the clusters whose every cell is kept, any
    overlap keeps every cluster touching the kept region; per-sample keep masks stay separate."""
    pyr = sphere_pyramid()
    a = sphere_assignments()
    face = torch.arange(96) // 16
    keep = torch.stack([face < 3, (face < 3) | (torch.arange(96) == 60)])  # sample 1: one cell of face 3 more
    whole = known_masks(pyr, keep, threshold=1.0)
    touch = known_masks(pyr, keep, threshold=1e-3)
    for k, n in enumerate(SPHERE):
        for c in range(n):
            members = keep[:, a[k] == c]  # (B, cells of cluster c)
            assert torch.equal(whole[k][:, c], members.all(1)), (k, c)
            assert torch.equal(touch[k][:, c], members.any(1)), (k, c)
    assert whole[0].tolist() == [[False], [False]]  # the root straddles the boundary: regenerated
    assert whole[1].tolist() == [[True, True, True, False, False, False]] * 2
    assert touch[1][1].tolist() == [True, True, True, True, False, False]  # face 3 touched in sample 1 only
    half = known_masks(pyr, keep, threshold=0.5)
    assert half[0].tolist() == [[True], [True]]  # exactly half of the sphere kept (48 of 96 cells)


def test_threshold_decides_whether_the_kept_region_is_reproduced():
    """The documented trade-off, on decoded data: with any-overlap masks the kept region of an
    edit decodes exactly as the reference (hard clusters, pointwise decoder); with threshold 1
    the straddling coarse tokens (the root, here) are regenerated and the kept region moves.
    Bug caught: masks that do not reach the decoder, or a threshold with the opposite meaning."""
    tok = sphere_tokenizer(sphere_pyramid())
    model = tiny_transformer(tok, num_classes=2)
    x = sphere_data(2)
    ref_idx = tok.encode(x)
    ref = tok.decode(ref_idx)
    face = torch.arange(96) // 16
    keep = (face < 3).expand(2, 96)
    kept = keep[:, None, :].expand_as(ref)
    out = {}
    for t in (1e-3, 1.0):
        masks = known_masks(tok.quantizer.pyramid, keep, threshold=t)
        out[t] = msar.sample(model, tok, labels=[0, 1], seed=0, known=ref_idx, known_mask=masks).data
    assert torch.allclose(out[1e-3][kept], ref[kept], atol=1e-5)
    assert (out[1.0][kept] - ref[kept]).abs().max() > 1e-3
    assert (out[1e-3][~kept] - ref[~kept]).abs().max() > 1e-3  # the rest is generated


def test_bad_keep_masks_are_named():
    pyr = sphere_pyramid()
    with pytest.raises(ValueError, match=r"expected shape \(B, 96\)"):
        known_masks(pyr, torch.ones(2, 95, dtype=torch.bool))
    with pytest.raises(ValueError, match="threshold"):
        known_masks(pyr, torch.ones(2, 96), threshold=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        known_masks(pyr, torch.full((2, 96), 2.0))
