"""Multi-scale residual quantizer invariants on rank 1/2/3 grids and operator hierarchies."""
import pytest
import torch
from hypothesis import given, strategies as st

from msar import MultiScaleResidualQuantizer, OperatorPyramid, PhiBank, ResidualDecodeState, ScaleSchedule


@st.composite
def grid_setups(draw):
    rank = draw(st.integers(1, 3))
    K = draw(st.integers(1, 4))
    sides = sorted(draw(st.lists(st.integers(1, 5), min_size=K, max_size=K)))
    scales = [(s,) * rank for s in sides]
    share = draw(st.sampled_from([0, 1, 2, 4]))
    return scales, share, draw(st.integers(0, 2 ** 16)), draw(st.booleans())


@st.composite
def operator_setups(draw):
    """A random hard-cluster hierarchy: N fine nodes, each level merges clusters of the next finer one."""
    N = draw(st.integers(1, 10))
    levels = [torch.arange(N)]
    n = N
    while n > 1:
        m = draw(st.integers(1, n - 1))
        parent = torch.tensor(draw(st.lists(st.integers(0, m - 1), min_size=n, max_size=n)))
        parent[:m] = torch.arange(m)  # every coarse cluster non-empty
        levels.insert(0, parent[levels[0]])
        n = m
    counts = [int(a.max()) + 1 for a in levels]
    return counts, levels, draw(st.integers(0, 2 ** 16))


def _check_invariants(q, f):
    idx = q.encode(f)
    sched = q.schedule
    assert [tuple(i.shape) for i in idx] == [(f.shape[0], n) for n in sched.token_counts]
    assert all(int(i.min()) >= 0 and int(i.max()) < q.vocab_size for i in idx)
    # per-scale contributions sum to the final latent
    fhats = q.encode_progression(f)
    total = q.indices_to_fhat(idx)
    torch.testing.assert_close(fhats[-1], total, atol=1e-5, rtol=1e-5)
    steps = q.indices_to_fhat_progression(idx)
    contribs = [steps[0]] + [b - a for a, b in zip(steps, steps[1:])]
    torch.testing.assert_close(sum(contribs), fhats[-1], atol=1e-5, rtol=1e-5)
    # incremental state reproduces the teacher-forcing input exactly
    tf = q.teacher_forcing_input(idx)
    state = ResidualDecodeState(q, f.shape[0], f.device)
    nexts = [n for k, i in enumerate(idx) if (n := state.add_scale(k, i)) is not None]
    if nexts:
        torch.testing.assert_close(torch.cat(nexts, 1), tf)
    torch.testing.assert_close(state.f_hat, fhats[-1], atol=1e-5, rtol=1e-5)
    return fhats


@given(grid_setups())
def test_grid_quantizer_invariants(setup):
    scales, share, seed, l2 = setup
    torch.manual_seed(seed)
    q = MultiScaleResidualQuantizer(32, 4, scales, share_phi=share, l2_norm=l2)
    f = torch.randn(2, 4, *scales[-1])
    _check_invariants(q, f)


@given(grid_setups())
def test_more_scales_never_increase_error_without_phi(setup):
    """Each scale's codeword is the nearest to the restricted residual; with phi off and the
    codebook containing 0, adding a scale can only keep or reduce the error when the
    finest scale is the full grid."""
    scales, _, seed, _ = setup
    torch.manual_seed(seed)
    q = MultiScaleResidualQuantizer(64, 3, scales, phi_ratio=0.0)
    q.embedding.weight.data[0] = 0  # "add nothing" is always available
    f = torch.randn(3, 3, *scales[-1])
    errs = [(fh - f).pow(2).mean().item() for fh in q.encode_progression(f)]
    # at the finest scale each token picks its nearest codeword directly: error can only drop
    assert errs[-1] <= errs[-2] + 1e-6 if len(errs) > 1 else True
    assert errs[-1] <= f.pow(2).mean().item() + 1e-6


def test_more_scales_reduce_error_on_trained_like_codebook():
    """Residual quantization with a codebook spanning the data: errors shrink scale by scale."""
    torch.manual_seed(0)
    scales = [(1, 1), (2, 2), (4, 4), (8, 8)]
    q = MultiScaleResidualQuantizer(512, 2, scales, phi_ratio=0.0)
    q.embedding.weight.data = torch.randn(512, 2) * 0.7
    q.embedding.weight.data[0] = 0
    f = torch.randn(4, 2, 8, 8)
    errs = [(fh - f).pow(2).mean().item() for fh in q.encode_progression(f)]
    assert all(b <= a + 1e-6 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.1 * f.pow(2).mean().item()


@given(operator_setups())
def test_operator_hierarchy_invariants(setup):
    counts, assignments, seed = setup
    torch.manual_seed(seed)
    pyr = OperatorPyramid.from_assignments(counts, assignments)
    q = MultiScaleResidualQuantizer(16, 3, pyr, share_phi=1)
    f = torch.randn(2, 3, counts[-1])
    _check_invariants(q, f)
    # per-sample operators: the same hierarchy batched gives the same tokens
    pyr_b = OperatorPyramid.from_assignments(counts, [a.expand(2, -1) for a in assignments])
    q_b = MultiScaleResidualQuantizer(16, 3, pyr_b, share_phi=1)
    q_b.load_state_dict(q.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(q.encode(f), q_b.encode(f)))


def test_training_forward_straight_through_and_losses():
    torch.manual_seed(0)
    q = MultiScaleResidualQuantizer(16, 4, [(1, 1), (2, 2), (4, 4)])
    f = torch.randn(2, 4, 4, 4, requires_grad=True)
    out = q(f)
    torch.testing.assert_close(out.f_hat, q.encode_progression(f.detach())[-1], atol=1e-5, rtol=1e-5)
    (out.f_hat.sum() + out.loss).backward()
    assert f.grad is not None and q.embedding.weight.grad is not None
    assert q.phi.convs[0].conv.weight.grad is not None
    # hits: per scale, how often each codeword was chosen (a bincount of the indices)
    assert out.hits.shape == (3, 16)
    for k, idx in enumerate(out.indices):
        assert torch.equal(out.hits[k], idx.flatten().bincount(minlength=16).float())


def test_forward_is_pure_and_record_usage_follows_vars_ema():
    """The training forward leaves usage statistics alone (the trainer reduces hits over ranks
    and records them); record_usage copies the first batch, then mixes with 0.9 / 0.99."""
    torch.manual_seed(0)
    q = MultiScaleResidualQuantizer(8, 2, [(1,), (4,)]).train()
    out = q(torch.randn(3, 2, 4))
    assert int(q.usage_steps) == 0 and not q.usage_ema.any()
    h1, h2 = out.hits, out.hits.roll(1, dims=1)
    q.record_usage(h1)
    torch.testing.assert_close(q.usage_ema, h1)
    q.record_usage(h2)
    torch.testing.assert_close(q.usage_ema, 0.9 * h1 + 0.1 * h2)
    assert int(q.usage_steps) == 2
    q.usage_steps.fill_(100)
    q.record_usage(h1)
    torch.testing.assert_close(q.usage_ema, 0.99 * (0.9 * h1 + 0.1 * h2) + 0.01 * h1)
    # the counter is module state: it travels with the state dict
    q2 = MultiScaleResidualQuantizer(8, 2, [(1,), (4,)])
    q2.load_state_dict(q.state_dict())
    assert int(q2.usage_steps) == 101
    with pytest.raises(ValueError, match=r"record_usage: expected hits of shape \(2, 8\)"):
        q.record_usage(torch.zeros(8))


def test_neighbourhood_phi_mixes_only_neighbours():
    """phi with a neighbourhood operator on a non-grid latent: a change at node 0 reaches
    node 0's neighbours through phi and nothing else (a pointwise phi reaches only node 0)."""
    torch.manual_seed(0)
    N = 5
    A = torch.zeros(N, N)
    A[0, 1] = A[1, 0] = 1.0  # nodes 0 and 1 are neighbours; 2, 3, 4 are isolated
    pyr = OperatorPyramid.from_assignments([1, N], [torch.zeros(N, dtype=torch.long), torch.arange(N)])
    q = MultiScaleResidualQuantizer(16, 3, pyr, share_phi=1, phi_neighbourhood=A)
    h = torch.zeros(1, 3, N)
    h2 = h.clone()
    h2[0, :, 0] = 1.0
    diff = (q.phi(h2, 1) - q.phi(h, 1)).abs().sum(1)[0]
    assert diff[0] > 0 and diff[1] > 0 and torch.all(diff[2:] == 0)
    _check_invariants(q, torch.randn(2, 3, N))
    with pytest.raises(ValueError, match="phi_neighbourhood"):
        MultiScaleResidualQuantizer(16, 3, pyr, phi_neighbourhood=torch.eye(4))


def test_phi_tick_selection_matches_var():
    # selections read off the reference implementation (10 scales / 4 phis; 5 scales / 3 phis)
    q = MultiScaleResidualQuantizer(8, 2, [(p, p) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)], share_phi=4)
    assert [q.phi.index(k) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    q3 = MultiScaleResidualQuantizer(8, 2, [(p, p) for p in (1, 2, 3, 4, 5)], share_phi=3)
    assert [q3.phi.index(k) for k in range(5)] == [0, 0, 1, 2, 2]
    q1 = MultiScaleResidualQuantizer(8, 2, [(1, 1), (2, 2), (3, 3)], share_phi=1)
    assert len(q1.phi.convs) == 1 and {q1.phi.index(k) for k in range(3)} == {0}
    q0 = MultiScaleResidualQuantizer(8, 2, [(1, 1), (2, 2), (3, 3)], share_phi=0)
    assert [q0.phi.index(k) for k in range(3)] == [0, 1, 2]
    qn = MultiScaleResidualQuantizer(8, 2, [(1, 1), (2, 2)], phi_ratio=0.0)
    assert len(qn.phi.convs) == 0


def test_dead_code_restart_reseeds_unused_codes():
    torch.manual_seed(0)
    q = MultiScaleResidualQuantizer(64, 2, [(1,), (4,)])
    f = torch.randn(8, 2, 4) * 0.01
    q.train()
    q.record_usage(q(f).hits)
    before = q.embedding.weight.detach().clone()
    n = q.restart_dead_codes(f)
    assert n > 0
    assert (q.embedding.weight != before).any(dim=1).sum() == n


def test_quantizer_rejects_wrong_latent_shape():
    q = MultiScaleResidualQuantizer(8, 4, [(1, 1), (2, 2)])
    with pytest.raises(ValueError, match=r"expected a latent of shape \(B, 4, 2, 2\)"):
        q.encode(torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="out of range"):
        q.indices_to_fhat([torch.zeros(1, 1, dtype=torch.long), torch.full((1, 4), 9)])


class _PerFramePyramid:
    """Two frames, each with its own spatial pyramid, laid out frame after frame: the
    full latent (C, 2, 2, 2) is not the last scale's grid (1, 2, 2)."""

    def __init__(self):
        self.schedule = ScaleSchedule([(1, 1, 1), (1, 2, 2), (1, 1, 1), (1, 2, 2)])
        self.full = (2, 2, 2)

    def restrict(self, f, k):
        t = k // 2
        return torch.nn.functional.interpolate(f[:, :, t:t + 1], size=self.schedule.shape(k), mode="area")

    resample = restrict

    def prolong(self, h, k):
        out = h.new_zeros(h.shape[0], h.shape[1], *self.full)
        t = k // 2
        out[:, :, t:t + 1] = torch.nn.functional.interpolate(h, size=(1, 2, 2), mode="trilinear")
        return out


def test_pyramid_full_shape_may_differ_from_last_scale():
    torch.manual_seed(0)
    pyr = _PerFramePyramid()
    q = MultiScaleResidualQuantizer(32, 3, pyr, phi_kernel=(1, 3, 3))
    assert q.phi.convs[0].conv.kernel_size == (1, 3, 3) and q.phi.convs[0].conv.padding == (0, 1, 1)
    f = torch.randn(2, 3, 2, 2, 2)
    fhats = _check_invariants(q, f)
    assert fhats[-1].shape == f.shape
    # a (1, 3, 3) phi never mixes frames: what scale 0 (frame 0) holds cannot reach frame 1
    a = q.upsample(q.lookup(torch.zeros(2, 1, dtype=torch.long), 0), 0)
    b = q.upsample(q.lookup(torch.full((2, 1), 5), 0), 0)
    assert not torch.allclose(a[:, :, 0], b[:, :, 0])
    torch.testing.assert_close(a[:, :, 1], b[:, :, 1])


class _TwoPyramids(ScaleSchedule):
    """Two 3-scale pyramids one after another (as per-frame video schedules lay them out)."""

    def progress(self, k: int) -> float:
        return (k % 3) / 2


def test_phi_follows_the_place_in_its_own_pyramid():
    # the bug this catches: phi chosen by k / (K - 1) over the whole sequence, so the second
    # pyramid's coarse scale got the fine phi (and a subclass's progress lost in GridPyramid)
    sched = _TwoPyramids([(1, 1), (2, 2), (4, 4)] * 2)
    single = MultiScaleResidualQuantizer(8, 2, [(1, 1), (2, 2), (4, 4)], share_phi=4)
    q = MultiScaleResidualQuantizer(8, 2, sched, share_phi=4)
    assert q.schedule is sched
    want = [single.phi.index(k) for k in range(3)]
    assert len(set(want)) == 3 and [q.phi.index(k) for k in range(6)] == want * 2
    with torch.no_grad():
        for i, conv in enumerate(q.phi.convs):
            for p in conv.parameters():
                p.copy_(torch.randn_like(p, generator=torch.Generator().manual_seed(i)))
    h = torch.randn(2, 2, 4, 4)
    for k in range(3):  # the same place in either pyramid refines with the same conv
        assert torch.equal(q.phi(h, k), q.phi(h, k + 3))
    assert not torch.equal(q.phi(h, 0), q.phi(h, 2))
    q0 = MultiScaleResidualQuantizer(8, 2, sched, share_phi=0)  # one per place in the pyramid
    assert len(q0.phi.convs) == 3 and [q0.phi.index(k) for k in range(6)] == [0, 1, 2] * 2
    with pytest.raises(ValueError, match="progress"):
        PhiBank(8, 3, progress=[0.0, 0.5])
    with pytest.raises(ValueError, match="progress"):
        PhiBank(8, 3, progress=[0.0, 0.5, 1.5])
