"""The conformance kit (msar.testing): it passes on correct core adapters of every
schedule kind, and it *fails* on adapters broken in the ways adapters really break."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import msar
from msar.testing import (assert_block_causal, assert_sampling_reproducible, check_adapter, random_indices,
                          random_schedules, tiny_transformer)

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
    """A core-only adapter on a cluster hierarchy (token-count scales, OperatorPyramid).
    With ``batch`` the assignments are per sample ``(B, N)``, as for a batch of graphs."""
    torch.manual_seed(seed)
    s = msar.ScaleSchedule(schedule)
    N = s.token_counts[-1]
    shape = (batch, N) if batch else (N,)
    assignments = [torch.randint(0, n, shape) for n in s.token_counts[:-1]]
    assignments.append(torch.arange(N).expand(*shape))  # finest level: identity
    q = msar.MultiScaleResidualQuantizer(V, C_LAT, msar.OperatorPyramid.from_assignments(s, assignments))
    return msar.MultiScaleVQTokenizer(nn.Conv1d(C_IN, C_LAT, 1), nn.Conv1d(C_LAT, C_IN, 1), q)


ALL_CHECKS = ["protocol", "shapes", "determinism", "round_trip", "teacher_forcing", "kv_cache", "sampling"]
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
        q, pyr = self.quantize, self.quantize.pyramid
        cumul = q.indices_to_fhat(indices, cumulative=True)
        return torch.cat([msar.to_tokens(pyr.resample(cumul[k + 1], k + 1)) for k in range(len(indices) - 1)], 1)


@settings(max_examples=10)
@given(random_schedules(kinds=("grid",), min_scales=2, max_scales=4, max_tokens=32), st.integers(0, 100))
def test_kit_catches_off_by_one_teacher_input(schedule, seed):
    torch.manual_seed(seed)
    good = grid_tokenizer(schedule, "identity", seed=seed)
    bad = OffByOneTeacher(nn.Identity(), nn.Identity(), good.quantize)
    data = grid_data(good, batch=2, encoder="identity", seed=seed)
    check_adapter(good, data)  # the same weights pass when the teacher input is right
    with pytest.raises(AssertionError, match=r"teacher_forcing.*scale 1\b"):
        check_adapter(bad, data)


@settings(max_examples=10)
@given(random_schedules(kinds=("count",), min_scales=2, max_scales=4, max_tokens=16))
def test_kit_catches_off_by_one_teacher_input_on_clusters(schedule):
    good = operator_tokenizer(schedule)
    bad = OffByOneTeacher(good.encoder, good.decoder, good.quantize)
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
    def start(self, batch_size, device):
        state = super().start(batch_size, device)
        add = state.add_scale

        def add_scale(k, idx, probs=None):
            nxt = add(k, idx, probs)
            return None if nxt is None else nxt[:, :-1]  # forgets a token of the next scale

        state.add_scale = add_scale
        return state


class FinishIgnoresLastScale(msar.MultiScaleVQTokenizer):
    def finish(self, state):
        last = self.quantize.upsample(self.quantize.lookup(state.indices[-1], len(self.schedule) - 1),
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
    bad = cls(encoder or nn.Identity(), nn.Identity(), good.quantize)
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


def test_kit_catches_sampling_that_uses_global_randomness():
    tok = grid_tokenizer(GRID_SCHEDULES["rank1"])
    model = tiny_transformer(tok, num_classes=2)

    def noisy_state(B, device):  # bug: the next-scale input draws from the global RNG
        state = tok.start(B, device)
        add = state.add_scale

        def add_scale(k, idx, probs=None):
            nxt = add(k, idx, probs)
            return None if nxt is None else nxt + 10 * torch.randn_like(nxt)

        state.add_scale = add_scale
        return state

    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 0, 1])
    with pytest.raises(AssertionError, match="not reproducible"):
        assert_sampling_reproducible(model, tok, labels, seed=0, state_factory=noisy_state)


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
