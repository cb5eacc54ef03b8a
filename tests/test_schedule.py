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
