"""Scale schedules and block-causal masks (hypothesis over random schedules)."""
import pytest
import torch
from hypothesis import given, strategies as st

from msar import ScaleSchedule


@st.composite
def schedules(draw):
    kind = draw(st.sampled_from(["r1", "r2", "r3", "count"]))
    K = draw(st.integers(1, 5))
    if kind == "count":
        return ScaleSchedule(draw(st.lists(st.integers(1, 9), min_size=K, max_size=K)))
    rank = int(kind[1])
    return ScaleSchedule([tuple(draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))) for _ in range(K)])


@given(schedules())
def test_mask_is_block_causal(s):
    L = s.L
    assert L == sum(s.token_counts) and s.offsets[-1] == L and len(s.offsets) == len(s) + 1
    lvl = s.level_ids()
    assert lvl.shape == (L,)
    m = s.attn_mask("bool")
    assert m.shape == (L, L) and m.dtype == torch.bool
    # equals level(query) >= level(key), checked element by element
    for i in range(L):
        for j in range(L):
            assert bool(m[i, j]) == (int(lvl[i]) >= int(lvl[j]))
    for k in range(len(s)):
        sl = s.slice(k)
        assert m[sl, sl].all(), "diagonal block must be full"
        assert (lvl[sl] == k).all()
        if sl.stop < L:
            assert not m[sl, sl.stop:].any(), "a token must never see a later scale"
        assert m[sl, :sl.start].all(), "a token sees every earlier scale"
    add = s.attn_mask("additive")
    assert torch.equal(add == 0, m) and torch.isinf(add[~m]).all()


@given(schedules())
def test_split_and_config_roundtrip(s):
    x = torch.arange(s.L).view(1, s.L)
    parts = s.split(x, dim=1)
    assert [p.shape[1] for p in parts] == s.token_counts
    assert torch.equal(torch.cat(parts, 1), x)
    assert ScaleSchedule(s.to_config()) == s


def test_raster_schedule_is_causal():
    s = ScaleSchedule.raster(6)
    assert torch.equal(s.attn_mask(), torch.tril(torch.ones(6, 6, dtype=torch.bool)))


@pytest.mark.parametrize("bad, err", [
    ([], ValueError), ([0], ValueError), ([(2, 0)], ValueError), ([(2, 2), (2, 2, 2)], ValueError),
    (["a"], TypeError), ([(1.5, 2)], TypeError), ([True], TypeError), ([()], TypeError),
])
def test_bad_schedules_get_clear_errors(bad, err):
    with pytest.raises(err, match="scale|schedule|rank"):
        ScaleSchedule(bad)


def test_check_indices_messages():
    s = ScaleSchedule([(1, 1), (2, 2)])
    good = [torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)]
    assert s.check_indices(good, 8) == 2
    with pytest.raises(ValueError, match="expected 2 scales, got 1"):
        s.check_indices(good[:1], 8)
    with pytest.raises(ValueError, match=r"indices\[1\].*\(B, 4\).*\(2, 3\)"):
        s.check_indices([good[0], torch.zeros(2, 3, dtype=torch.long)], 8)
    with pytest.raises(ValueError, match="out of range \\[0, 8\\).*max 8"):
        s.check_indices([good[0], torch.full((2, 4), 8)], 8)
    with pytest.raises(ValueError, match="batch size 3 does not match batch size 2"):
        s.check_indices([good[0], torch.zeros(3, 4, dtype=torch.long)], 8)
    with pytest.raises(TypeError, match="integer tensor"):
        s.check_indices([good[0], torch.zeros(2, 4)], 8)


def _centre_map(shape):
    """``(1, rank, *shape)``: channel d holds the cell centre ``(i_d + 0.5) / n_d``."""
    axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij")).unsqueeze(0)


@st.composite
def dividing_schedules(draw):
    rank = draw(st.integers(1, 3))
    finest = tuple(draw(st.sampled_from([1, 2, 4, 8])) for _ in range(rank))
    coarse = draw(st.lists(st.tuples(*[st.sampled_from([d for d in (1, 2, 4, 8) if n % d == 0]) for n in finest]),
                           min_size=0, max_size=3))
    return ScaleSchedule(sorted(coarse, key=lambda s: s) + [finest])


@given(dividing_schedules())
def test_coordinates_follow_the_token_layout_and_the_pyramid(s):
    """Catches a flatten order other than the tokens' and coordinates that do not sit where the
    pyramid puts a token: a coarse token's centre is the area average of the finest centres it
    pools (GridPyramid.restrict of the finest centre map)."""
    from msar import GridPyramid
    from msar.quantizer import to_tokens
    pyr = GridPyramid(s)
    fine = _centre_map(s[-1])
    for k in range(len(s)):
        c = s.coordinates(k)
        assert c.shape == (s.token_counts[k], s.rank)
        torch.testing.assert_close(c, to_tokens(_centre_map(s[k]))[0])
        torch.testing.assert_close(c, to_tokens(pyr.restrict(fine, k))[0])
    assert torch.equal(s.token_coordinates(), torch.cat([s.coordinates(k) for k in range(len(s))]))


def test_coordinates_need_a_grid():
    with pytest.raises(ValueError, match="token count"):
        ScaleSchedule([3, 5]).coordinates(1)
    with pytest.raises(IndexError, match="out of range"):
        ScaleSchedule([(1, 1), (2, 2)]).coordinates(2)
