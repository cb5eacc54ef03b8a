"""The conformance kit (msar.testing): it passes on correct core adapters of every
schedule kind, and it *fails* on adapters broken in the ways adapters really break."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import msar
from msar.testing import (assert_block_causal, assert_sampling_reproducible, check_adapter, check_pyramid,
                          random_indices, random_schedules, tiny_transformer)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
C_IN, C_LAT, V = 3, 8, 16


def grid_tokenizer(schedule, encoder: str = "conv", seed: int = 0) -> msar.MultiScaleVQTokenizer:
    """A core-only adapter on a regular grid: 1x1-conv (or identity) encoder and decoder."""
    torch.manual_seed(seed)
    s = msar.ScaleSchedule(schedule)
    q = msar.MultiScaleResidualQuantizer(V, C_LAT, s)
    if encoder == "identity":
        return msar.MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), q)
    conv = CONV[s.rank]
    return msar.MultiScaleVQTokenizer(conv(C_IN, C_LAT, 1), conv(C_LAT, C_IN, 1), q)


def grid_data(tok, batch: int = 3, encoder: str = "conv", seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ch = C_LAT if encoder == "identity" else C_IN
    return torch.randn(batch, ch, *tok.schedule.shape(-1), generator=g)


def operator_tokenizer(schedule, batch: int | None = None, seed: int = 0) -> msar.MultiScaleVQTokenizer:
    """A core-only adapter on a cluster hierarchy (token-count scales, OperatorPyramid): random,
    not necessarily nested clusters, none empty. With ``batch`` the assignments are per sample
    ``(B, N)``, as for a batch of graphs."""
    torch.manual_seed(seed)
    s = msar.ScaleSchedule(schedule)
    N = s.token_counts[-1]
    rows = []
    for _ in range(batch or 1):
        levels = []
        for n in s.token_counts[:-1]:
            a = torch.randint(0, n, (N,))
            a[torch.randperm(N)[:n]] = torch.arange(n)  # every cluster gets a member
            levels.append(a)
        levels.append(torch.arange(N))  # finest level: identity
        rows.append(levels)
    assignments = [torch.stack([r[k] for r in rows]) if batch else rows[0][k] for k in range(len(s))]
    q = msar.MultiScaleResidualQuantizer(V, C_LAT, msar.OperatorPyramid.from_assignments(s, assignments))
    return msar.MultiScaleVQTokenizer(nn.Conv1d(C_IN, C_LAT, 1), nn.Conv1d(C_LAT, C_IN, 1), q)


ALL_CHECKS = ["protocol", "shapes", "pyramid", "determinism", "round_trip", "scales_matter", "teacher_forcing",
              "kv_cache", "sampling"]
GRID_SCHEDULES = {
    "rank1": [(1,), (2,), (4,), (8,)],
    "rank2": [(1, 1), (2, 2), (3, 3), (4, 4)],
    "rank3": [(1, 1, 1), (1, 2, 2), (2, 4, 4)],
}


# ---------------------------------------------------------------------------- the kit passes on correct adapters
@pytest.mark.parametrize("encoder", ["identity", "conv"])
@pytest.mark.parametrize("name", list(GRID_SCHEDULES))
@pytest.mark.parametrize("num_classes", [0, 3])
def test_grid_adapters_conform(name, encoder, num_classes):
    tok = grid_tokenizer(GRID_SCHEDULES[name], encoder)
    model = tiny_transformer(tok, num_classes=num_classes)
    report = check_adapter(tok, grid_data(tok, encoder=encoder), model=model)
    assert report["checks"] == ALL_CHECKS
    assert report["batch_size"] == 3
    assert report["teacher_forcing_max_abs_diff"] <= 1e-5
    assert report["kv_cache_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("per_sample", [False, True])
def test_operator_pyramid_adapter_conforms(per_sample):
    B = 3
    tok = operator_tokenizer([1, 3, 6, 12], batch=B if per_sample else None)
    data = torch.randn(B, C_IN, 12)
    report = check_adapter(tok, data, model=tiny_transformer(tok, num_classes=2))
    assert report["checks"] == ALL_CHECKS


@settings(max_examples=10)
@given(random_schedules(kinds=("grid",), max_scales=4, max_tokens=32), st.integers(0, 2**16))
def test_random_grid_schedules_conform(schedule, seed):
    tok = grid_tokenizer(schedule, "conv", seed=seed % 7)
    report = check_adapter(tok, grid_data(tok, batch=2, seed=seed), model=tiny_transformer(tok, num_classes=2))
    assert report["checks"] == ALL_CHECKS


@settings(max_examples=10)
@given(random_schedules(kinds=("count",), max_scales=4, max_tokens=24), st.booleans())
def test_random_cluster_hierarchies_conform(schedule, per_sample):
    tok = operator_tokenizer(schedule, batch=2 if per_sample else None)
    data = torch.randn(2, C_IN, schedule.token_counts[-1])
    assert check_adapter(tok, data, model=tiny_transformer(tok))["checks"] == ALL_CHECKS


def test_check_adapter_restores_training_mode():
    tok = grid_tokenizer(GRID_SCHEDULES["rank1"])
    model = tiny_transformer(tok).train()
    tok.train()
    check_adapter(tok, grid_data(tok), model=model)
    assert tok.training and model.training


# ---------------------------------------------------------------------------- masks
@given(random_schedules(kinds=("grid", "count")))
def test_schedule_masks_are_block_causal(schedule):
    assert_block_causal(schedule)
    assert_block_causal(schedule, msar.NextScaleTransformer(msar.TransformerConfig(
        schedule.to_config(), 4, 2, depth=1, embed_dim=8, num_heads=1)).attn_mask)


@given(random_schedules(kinds=("grid", "count"), min_scales=2), st.data())
def test_block_causal_check_catches_any_flipped_entry(schedule, data):
    mask = schedule.attn_mask("bool").clone()
    L = schedule.L
    i = data.draw(st.integers(0, L - 1))
    j = data.draw(st.integers(0, L - 1))
    mask[i, j] = ~mask[i, j]
    with pytest.raises(AssertionError, match="not block-causal"):
        assert_block_causal(schedule, mask)


def test_plain_causal_mask_is_not_block_causal():
    s = msar.ScaleSchedule([(1,), (2,), (4,)])
    causal = torch.ones(s.L, s.L, dtype=torch.bool).tril()  # next-token mask: wrong inside a scale
    with pytest.raises(AssertionError, match="not block-causal"):
        assert_block_causal(s, causal)


# ---------------------------------------------------------------------------- the kit fails on broken adapters
class OffByOneTeacher(msar.MultiScaleVQTokenizer):
    """Bug: the input of scale k+1 is built from the latent *including* scale k+1
    (a leak of the answer), instead of the latent accumulated over scales <= k."""

    def teacher_forcing_input(self, indices):
        q, pyr = self.quantizer, self.quantizer.pyramid
        cumul = q.indices_to_fhat_progression(indices)
        return torch.cat([msar.to_tokens(pyr.resample(cumul[k + 1], k + 1)) for k in range(len(indices) - 1)], 1)


@settings(max_examples=10)
@given(random_schedules(kinds=("grid",), min_scales=2, max_scales=4, max_tokens=32), st.integers(0, 100))
def test_kit_catches_off_by_one_teacher_input(schedule, seed):
    torch.manual_seed(seed)
    good = grid_tokenizer(schedule, "identity", seed=seed)
    bad = OffByOneTeacher(nn.Identity(), nn.Identity(), good.quantizer)
    data = grid_data(good, batch=2, encoder="identity", seed=seed)
    check_adapter(good, data)  # the same weights pass when the teacher input is right
    with pytest.raises(AssertionError, match=r"teacher_forcing.*scale 1\b"):
        check_adapter(bad, data)


@settings(max_examples=10)
@given(random_schedules(kinds=("count",), min_scales=2, max_scales=4, max_tokens=16))
def test_kit_catches_off_by_one_teacher_input_on_clusters(schedule):
    good = operator_tokenizer(schedule)
    bad = OffByOneTeacher(good.encoder, good.decoder, good.quantizer)
    with pytest.raises(AssertionError, match="teacher_forcing"):
        check_adapter(bad, torch.randn(2, C_IN, schedule.token_counts[-1]))


class OutOfVocab(msar.MultiScaleVQTokenizer):
    def encode(self, data):
        idx = super().encode(data)
        idx[-1] = idx[-1] + self.vocab_size
        return idx


class WrongScaleCount(msar.MultiScaleVQTokenizer):
    def encode(self, data):
        return super().encode(data)[:-1]


class NoisyEncoder(nn.Module):
    """Randomness that survives eval mode (e.g. a sampling VAE encoder without a switch)."""

    def forward(self, x):
        return x + torch.randn_like(x)


class DropsSamples(msar.MultiScaleVQTokenizer):
    def decode(self, indices):
        return super().decode(indices)[:1]


class StateShape(msar.MultiScaleVQTokenizer):
    def start(self, batch_size, device, context=None):
        state = super().start(batch_size, device, context)
        add = state.add_scale

        def add_scale(k, idx, probs=None):
            nxt = add(k, idx, probs)
            return None if nxt is None else nxt[:, :-1]  # forgets a token of the next scale

        state.add_scale = add_scale
        return state


class FinishIgnoresLastScale(msar.MultiScaleVQTokenizer):
    def finish(self, state):
        last = self.quantizer.upsample(self.quantizer.lookup(state.indices[-1], len(self.schedule) - 1),
                                      len(self.schedule) - 1)
        return self.decode_latent(state.f_hat - last)


@pytest.mark.parametrize("cls, encoder, check", [
    (OutOfVocab, None, r"shapes.*out of range"),
    (WrongScaleCount, None, r"shapes.*3 scales"),
    (msar.MultiScaleVQTokenizer, NoisyEncoder(), "determinism"),
    (DropsSamples, None, r"round_trip.*batch size 1"),
    (StateShape, None, "teacher_forcing.*add_scale"),
    (FinishIgnoresLastScale, None, r"teacher_forcing.*finish"),
])
def test_kit_catches_broken_adapters(cls, encoder, check):
    good = grid_tokenizer(GRID_SCHEDULES["rank1"], "identity")
    bad = cls(encoder or nn.Identity(), nn.Identity(), good.quantizer)
    with pytest.raises(AssertionError, match=check):
        check_adapter(bad, grid_data(good, encoder="identity"))


def test_kit_catches_missing_protocol_method():
    class NoFinish:
        schedule, vocab_size, latent_dim = msar.ScaleSchedule([1, 2]), 4, 2
        encode = decode = teacher_forcing_input = start = lambda self, *a: None
    with pytest.raises(AssertionError, match="protocol.*finish"):
        check_adapter(NoFinish(), torch.zeros(1, 2))


def test_kit_catches_kv_cache_that_forgets_earlier_scales():
    tok = grid_tokenizer(GRID_SCHEDULES["rank2"])
    model = tiny_transformer(tok, num_classes=2)

    def step_without_cache(h, cond, cond_blocks, caches):  # bug: attends to its own scale only
        for b in model.blocks:
            h = b(h, cond_blocks, attn_mask=None, cache=None)
        return model.logits(h, cond)

    model.step = step_without_cache
    with pytest.raises(AssertionError, match=r"kv_cache.*scale 1\b"):
        check_adapter(tok, grid_data(tok), model=model)


def test_kit_catches_model_with_other_schedule():
    tok = grid_tokenizer(GRID_SCHEDULES["rank1"])
    other = grid_tokenizer([(1,), (3,), (8,)])
    with pytest.raises(AssertionError, match="model schedule"):
        check_adapter(tok, grid_data(tok), model=tiny_transformer(other))


class NoisyState(msar.MultiScaleVQTokenizer):
    """Bug: the next-scale input draws from the global RNG, not the sampler's generator."""

    def start(self, batch_size, device, context=None):
        state = super().start(batch_size, device, context)
        add = state.add_scale

        def add_scale(k, idx, probs=None):
            nxt = add(k, idx, probs)
            return None if nxt is None else nxt + 10 * torch.randn_like(nxt)

        state.add_scale = add_scale
        return state


def test_kit_catches_sampling_that_uses_global_randomness():
    good = grid_tokenizer(GRID_SCHEDULES["rank1"])
    tok = NoisyState(good.encoder, good.decoder, good.quantizer)
    model = tiny_transformer(tok, num_classes=2)
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 1])
    with pytest.raises(AssertionError, match="not reproducible"):
        assert_sampling_reproducible(model, tok, labels, seed=0)


class ContextTokenizer(msar.MultiScaleVQTokenizer):
    """An adapter whose decode state needs per-batch context (here: a per-sample offset)."""

    def start(self, batch_size, device, context=None):
        if context is None or context.shape != (batch_size,):
            raise TypeError(f"start needs the batch's context ({batch_size},), got {context!r}")
        return super().start(batch_size, device)


def test_context_reaches_start():
    """Bug caught: the kit (or msar.sample) calling start() without the adapter's context."""
    good = grid_tokenizer(GRID_SCHEDULES["rank1"])
    tok = ContextTokenizer(good.encoder, good.decoder, good.quantizer)
    x = grid_data(good)
    report = check_adapter(tok, x, model=tiny_transformer(tok), context=torch.zeros(3))
    assert report["checks"] == ALL_CHECKS
    with pytest.raises(TypeError, match="context"):
        check_adapter(tok, x)


def test_random_indices_are_valid():
    s = msar.ScaleSchedule([(1, 1), (2, 3)])
    idx = random_indices(s, 7, batch_size=4)
    assert s.check_indices(idx, 7) == 4
    assert all(torch.equal(a, b) for a, b in zip(idx, random_indices(s, 7, batch_size=4)))


def test_adapter_guide_code_runs():
    """Every ```python block of docs/adapter_guide.md runs, in order, in one namespace:
    the guide a newcomer follows cannot drift from the API."""
    import os
    import re
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "adapter_guide.md")
    blocks = re.findall(r"```python\n(.*?)```", open(path).read(), re.S)
    assert len(blocks) >= 8
    ns: dict = {"__name__": "adapter_guide"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"adapter_guide.md[block {i}]", "exec"), ns)
    assert ns["report"]["checks"] == ALL_CHECKS


def test_examples_index_lists_every_example():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    index = open(os.path.join(root, "docs", "examples.md")).read()
    names = [n for n in os.listdir(os.path.join(root, "examples"))
             if (n.endswith(".py") and not n.startswith("_")) or os.path.isdir(os.path.join(root, "examples", n))
             and not n.startswith(("_", "."))]
    missing = [n for n in names if f"examples/{n}" not in index]
    assert not missing, f"docs/examples.md does not list {missing}"


# ---------------------------------------------------------------------------- pyramid semantics
# A non-grid adapter: fields on a nested pixelisation of the cube-sphere. Each of the 6 faces
# is split into 2 x 2 and then 4 x 4 cells; tokens: the whole sphere, the faces, the quarter
# faces and the 96 cells. Restriction averages the cells of a coarse cell.
SPHERE = [1, 6, 24, 96]


def sphere_assignments(sides=(None, 1, 2, 4)) -> list[torch.Tensor]:
    """Cluster of each of the 96 finest cells (face f, row i, column j of a 4 x 4 face) at every
    level; side None is the single root cell."""
    f, i, j = torch.meshgrid(torch.arange(6), torch.arange(4), torch.arange(4), indexing="ij")
    f, i, j = f.flatten(), i.flatten(), j.flatten()
    return [torch.zeros(96, dtype=torch.long) if s is None else f * s * s + (i * s // 4) * s + (j * s // 4)
            for s in sides]


def non_sibling_grouping() -> torch.Tensor:
    """Quarter-face clusters with two cells swapped across faces: cluster 1 (face 0) takes cell 16
    (face 1) and cluster 4 (face 1) takes cell 3 (face 0). Every cluster still has 4 cells."""
    a = sphere_assignments()[2].clone()
    a[3], a[16] = a[16].clone(), a[3].clone()
    return a


def sphere_pyramid(bug: str | None = None) -> msar.OperatorPyramid:
    a = sphere_assignments()
    good = msar.OperatorPyramid.from_assignments(SPHERE, a)
    R, P = list(good.restrict_ops), list(good.prolong_ops)
    if bug is None:
        return good
    if bug == "sum":  # scale 2 restricts by summing its 4 cells
        R[2] = P[2].T.clone()
    elif bug == "zero_prolong":  # scale 1 never reaches the latent
        P[1] = torch.zeros_like(P[1])
    elif bug == "empty":  # quarter-face 5's cells were given to quarter-face 4
        a[2] = torch.where(a[2] == 5, 4, a[2])
        return msar.OperatorPyramid.from_assignments(SPHERE, a, allow_empty=True)
    elif bug == "count":  # the schedule says 25 quarter faces, the hierarchy has 24
        return msar.OperatorPyramid.from_assignments([1, 6, 25, 96], a, allow_empty=True)
    elif bug == "non_sibling":  # clusters mix cells of two faces (consistent R and P)
        a[2] = non_sibling_grouping()
        return msar.OperatorPyramid.from_assignments(SPHERE, a)
    elif bug == "mismatched":  # restriction groups siblings, prolongation copies to other cells
        P[2] = msar.OperatorPyramid.from_assignments(SPHERE, a[:2] + [non_sibling_grouping()] + a[3:]).prolong_ops[2]
    else:
        raise ValueError(bug)
    return msar.OperatorPyramid(SPHERE if bug != "count" else [1, 6, 25, 96], R, P)


def sphere_tokenizer(pyramid, cls=msar.MultiScaleVQTokenizer) -> msar.MultiScaleVQTokenizer:
    torch.manual_seed(0)
    q = msar.MultiScaleResidualQuantizer(V, C_LAT, pyramid)
    return cls(nn.Conv1d(C_IN, C_LAT, 1), nn.Conv1d(C_LAT, C_IN, 1), q)


def sphere_data(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, C_IN, 96, generator=torch.Generator().manual_seed(0))


def test_sphere_adapter_conforms():
    tok = sphere_tokenizer(sphere_pyramid())
    report = check_adapter(tok, sphere_data(), model=tiny_transformer(tok, num_classes=2), nested=True)
    assert report["checks"] == ALL_CHECKS
    assert report["pyramid"]["checks"] == ["counts", "finite", "empty", "constants", "round_trip", "nested"]
    assert max(report["pyramid"]["round_trip_error"]) < 1e-6  # hard clusters: exact


@pytest.mark.parametrize("bug, match", [
    ("sum", r"check_pyramid\[constants\]: scale 2: restricting the constant field 1.5 gives 6 .*sum"),
    ("zero_prolong", r"check_pyramid\[constants\]: scale 1: prolong maps the constant 1.5 to zero"),
    ("empty", r"check_pyramid\[empty\]: scale 2: token 5 of 24 has an empty support"),
    ("count", r"check_pyramid\[empty\]: scale 2: token 24 of 25 has an empty support.*n_2 = 25"),
    ("mismatched", r"check_pyramid\[round_trip\]: scale 2: restrict\(prolong\(h\)\) differs from h"),
    ("non_sibling", r"check_pyramid\[nested\]: scales 1 and 2: token 0 of scale 1 is not a union"),
])
def test_kit_catches_broken_sphere_pyramids(bug, match):
    """Each of these adapters trains and reconstructs (the finest scale absorbs the error); the kit
    names the scale and what is wrong."""
    tok = sphere_tokenizer(sphere_pyramid(bug))
    data = sphere_data(3 if bug != "count" else 3)
    with pytest.raises(AssertionError, match=match):
        check_adapter(tok, data, model=tiny_transformer(tok), nested=True)


def test_non_sibling_grouping_needs_the_nested_declaration():
    """Grouping non-siblings is a legitimate (non-nested) hierarchy unless the adapter declares a
    tree: without nested=True the kit accepts it, with it the kit names the scales."""
    check_pyramid(sphere_pyramid("non_sibling"))
    with pytest.raises(AssertionError, match=r"nested.*scales 1 and 2"):
        check_pyramid(sphere_pyramid("non_sibling"), nested=True)


class DropsScaleDecoder(msar.MultiScaleVQTokenizer):
    """Bug: the decoder reads the tokens of every scale but 1 (a scale the decoder ignores)."""

    def decode(self, indices):
        kept = list(indices)
        kept[1] = torch.zeros_like(kept[1])
        return super().decode(kept)


def test_kit_catches_a_scale_the_decoder_ignores():
    tok = sphere_tokenizer(sphere_pyramid(), DropsScaleDecoder)
    with pytest.raises(AssertionError, match=r"scales_matter.*scale 1: changing every token of scale 1 leaves decode"):
        check_adapter(tok, sphere_data())


class CountMismatch:
    """A hand-written pyramid whose schedule counts 25 quarter faces where its operators give 24."""

    def __init__(self):
        self.inner = sphere_pyramid()
        self.schedule, self.full = msar.ScaleSchedule([1, 6, 25, 96]), (96,)

    def restrict(self, f, k):
        return self.inner.restrict(f, k)

    resample = restrict

    def prolong(self, h, k):
        return self.inner.prolong(h, k)


def test_kit_catches_a_schedule_that_disagrees_with_the_operators():
    with pytest.raises(AssertionError, match=r"counts\]: scale 2: restrict\(f, 2\) returned \(2, 4, 24\).*n_2 = 25"):
        check_pyramid(CountMismatch())


class NearestNoFinest:
    """Bug: the schedule stops at 4 tokens on a latent of 8 cells (the last scale is not the full
    resolution), so the residual can never be reduced to zero."""

    def __init__(self):
        self.schedule, self.full = msar.ScaleSchedule([(1,), (2,), (4,)]), (8,)

    def restrict(self, f, k):
        return torch.nn.functional.adaptive_avg_pool1d(f, self.schedule.shape(k)[0])

    resample = restrict

    def prolong(self, h, k):
        return torch.nn.functional.interpolate(h, size=self.full, mode="nearest")


def test_kit_catches_a_last_scale_below_full_resolution():
    with pytest.raises(AssertionError, match=r"counts\]: scale 2: the last scale has 4 tokens but the full latent"):
        check_pyramid(NearestNoFinest())


class SummingGrid(msar.GridPyramid):
    def restrict(self, f, k):  # bug: at scale 1, area pooling times the pooling ratio = the sum of the cells
        ratio = f[0, 0].numel() / torch.Size(self.schedule.shape(k)).numel()
        return super().restrict(f, k) * (ratio if k == 1 else 1)


class ZeroProlongGrid(msar.GridPyramid):
    def prolong(self, h, k):  # bug: scale 1 contributes nothing
        p = super().prolong(h, k)
        return p * 0 if k == 1 else p


class FlippedProlongGrid(msar.GridPyramid):
    def prolong(self, h, k):  # bug: scale 1 lands mirrored (constants still survive)
        p = super().prolong(h, k)
        return p.flip(-1) if k == 1 else p


@pytest.mark.parametrize("cls, match", [
    (SummingGrid, r"constants\]: scale 1: .* gives 6 "),
    (ZeroProlongGrid, r"constants\]: scale 1: prolong maps .* to zero"),
    (FlippedProlongGrid, r"round_trip\]: scale 1: .*relative error of 1\.\d+"),
])
def test_kit_catches_broken_grid_pyramids(cls, match):
    with pytest.raises(AssertionError, match=match):
        check_pyramid(cls([(1, 1), (2, 3), (4, 6)]))


@settings(max_examples=20, deadline=None)
@given(random_schedules(kinds=("grid",), max_scales=5, max_side=16, max_tokens=512))
def test_interpolating_grid_pyramids_pass_the_approximate_round_trip(schedule):
    """The approximate round trip admits area / bicubic / trilinear pyramids of any schedule (the
    bugs it must catch give a relative error >= 1)."""
    report = check_pyramid(msar.GridPyramid(schedule))
    assert max(report["round_trip_error"]) < 0.95


def test_operator_pyramid_rejects_nan_and_empty_clusters():
    a = sphere_assignments()
    good = msar.OperatorPyramid.from_assignments(SPHERE, a)
    R = list(good.restrict_ops)
    R[1] = R[1].clone()
    R[1][2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"restrict_ops\[1\] \(scale 1\) has 1 NaN or infinite entries.*\(2, 5\)"):
        msar.OperatorPyramid(SPHERE, R, good.prolong_ops)
    P = list(good.prolong_ops)
    P[3] = P[3] * float("inf")
    with pytest.raises(ValueError, match=r"prolong_ops\[3\] \(scale 3\)"):
        msar.OperatorPyramid(SPHERE, good.restrict_ops, P)
    with pytest.raises(ValueError, match=r"assignments\[2\] \(scale 2\): cluster 24 has no member.*n_2 = 25"):
        msar.OperatorPyramid.from_assignments([1, 6, 25, 96], a)
    per_sample = [x.expand(2, -1).clone() for x in a]
    per_sample[1][1] = torch.where(per_sample[1][1] == 3, 2, per_sample[1][1])
    with pytest.raises(ValueError, match=r"assignments\[1\] \(scale 1\): cluster 3 of sample 1 has no member"):
        msar.OperatorPyramid.from_assignments(SPHERE, per_sample)
    padded = msar.OperatorPyramid.from_assignments(SPHERE, per_sample, allow_empty=True)
    assert padded.restrict(torch.ones(2, 1, 96), 1)[1, 0, 3] == 0  # empty clusters restrict to zero
