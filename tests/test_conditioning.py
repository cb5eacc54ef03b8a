"""Conditions beyond class labels (msar.Condition): validation, padding, the null condition and
guidance, KV cache with cross-attention, class models unchanged, training batches.

Each test names the bug it catches."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from msar import (Acceleration, Condition, MultiScaleResidualQuantizer, MultiScaleVQTokenizer, sample,
                  quantize_int8)
from msar.models.transformer import CrossAttention
from msar.testing import assert_kv_cache_equivalent, check_adapter, random_condition, tiny_transformer
from msar.training import TransformerTrainConfig, TransformerTrainer

SCHED = [(1, 1), (2, 2), (3, 3)]
V, C, D = 16, 4, 6


def tok():
    return MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(V, C, SCHED))


def model(kind="sequence", cross=None, shared=False, seed=0, **kw):
    kw = {"cond_kind": kind, "cond_dim": D if kind != "classes" else 0, "cross_attention": cross,
          "shared_aln": shared, "depth": 2, "embed_dim": 32, **kw}
    if kind == "classes":
        kw.setdefault("num_classes", 3)
    return tiny_transformer(tok(), seed=seed, **kw)


def seq(B=3, T=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    real = torch.tensor([T, 2, 1][:B] + [T] * max(0, B - 3))
    return Condition.sequence(torch.randn(B, T, D, generator=g), torch.arange(T) < real.unsqueeze(1))


def teacher(t, B, seed=1):
    idx = t.encode(torch.randn(B, C, 3, 3, generator=torch.Generator().manual_seed(seed)))
    return idx, t.teacher_forcing_input(idx)


# ---------------------------------------------------------------------------- Condition itself
def test_condition_validation_errors_name_what_is_wrong():
    """Bug: a malformed condition accepted and failing later, deep in attention (or silently
    attending to padding)."""
    with pytest.raises(ValueError, match="integer dtype"):
        Condition.classes(torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"expected features \(B, D\)"):
        Condition.vector(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="floating-point"):
        Condition.sequence(torch.ones(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask must have shape \(B, T\) = \(2, 3\)"):
        Condition.sequence(torch.randn(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be a bool"):
        Condition.sequence(torch.randn(2, 3, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        Condition.sequence(torch.randn(2, 3, 4), torch.tensor([[True, False, False], [False] * 3]))
    c = Condition.cat([seq(2, 3), seq(1, 5)])  # right-padded to the longest
    assert (c.batch_size, c.length, c.dim) == (3, 5, D) and not c.mask[:2, 3:].any()
    assert Condition.from_tensors("sequence", c.features, c.mask).mask.equal(c.mask)
    assert c[1].mask.equal(c.mask[1:2]) and c[-1].features.equal(c.features[2:])  # an int keeps the batch dim


# ---------------------------------------------------------------------------- class models unchanged
def test_class_condition_is_bit_identical_to_labels():
    """Bug: wrapping labels in Condition.classes takes another path (different ops, different
    logits or samples); a class model gains parameters (old checkpoints would not load)."""
    m, t = model("classes"), tok()
    labels = torch.tensor([0, 2, 1])
    _, x = teacher(t, 3)
    assert torch.equal(m(labels, x), m(Condition.classes(labels), x))
    a = sample(m, t, labels, cfg=2.0, top_k=0, top_p=0.9, seed=3)
    b = sample(m, t, condition=Condition.classes(labels), cfg=2.0, top_k=0, top_p=0.9, seed=3)
    assert all(torch.equal(i, j) for i, j in zip(a.indices, b.indices)) and torch.equal(a.labels, b.labels)
    keys = set(m.state_dict())
    assert not any(k.startswith(("cond_proj", "null_context")) or ".cross_attn." in k for k in keys)


# ---------------------------------------------------------------------------- shapes, padding, errors
@pytest.mark.parametrize("kind,cross", [("vector", None), ("vector", True), ("sequence", None), ("sequence", False)])
def test_every_kind_gives_logits_and_kv_cache_equals_full_forward(kind, cross):
    """Bug: the incremental path (sampling) sees another condition than the teacher-forced one
    (cross-attention keys / values, pooled start token, AdaLN), so sampling does not match training."""
    for shared in (False, True):
        m, t = model(kind, cross, shared=shared), tok()
        c = random_condition(m, 3)
        idx, x = teacher(t, 3)
        assert m(c, x).shape == (3, 14, V)
        assert assert_kv_cache_equivalent(m, t, idx, c, atol=1e-5) <= 1e-5


@settings(max_examples=12, deadline=None)
@given(rank=st.integers(1, 3), sides=st.lists(st.integers(1, 3), min_size=1, max_size=3), shared=st.booleans(),
       T=st.integers(1, 5), seed=st.integers(0, 99))
def test_kv_cache_with_cross_attention_on_random_schedules(rank, sides, shared, T, seed):
    """The same property over schedules of rank 1-3, sequence lengths and paddings (the pattern
    of test_transformer_sampling's KV-cache test)."""
    sched = [(s,) * rank for s in sorted(sides)]
    t = MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(V, C, sched))
    m = tiny_transformer(t, depth=2, embed_dim=32, seed=seed, cond_kind="sequence", cond_dim=D, shared_aln=shared)
    idx = t.encode(torch.randn(3, C, *sched[-1], generator=torch.Generator().manual_seed(seed)))
    assert_kv_cache_equivalent(m, t, idx, random_condition(m, 3, length=T, seed=seed), atol=1e-5)


def test_kv_cache_check_fails_when_cross_attention_is_skipped():
    """The property can fail: the incremental pass without cross-attention differs."""
    m, t = model(), tok()
    c = seq()
    idx, x = teacher(t, 3)
    real = m.step
    m.step = lambda *a, cross=None, **kw: real(*a, **kw)  # the cached pass forgets the condition sequence
    with pytest.raises(AssertionError, match="kv_cache"):
        assert_kv_cache_equivalent(m, t, idx, c)


def test_padding_changes_nothing():
    """Bug: padded positions reach the result (mask ignored in pooling or cross-attention, or
    a product with the mask that lets NaN through)."""
    m, t = model(), tok()
    c = seq()
    _, x = teacher(t, 3)
    ref = m(c, x)
    junk = c.features.clone()
    junk[~c.mask] = float("nan")
    assert torch.equal(m(Condition.sequence(junk, c.mask), x), ref)
    longer = Condition.cat([c, Condition.sequence(torch.randn(1, 9, D))])[:3]  # 5 more padded positions
    assert longer.length == 9
    torch.testing.assert_close(m(longer, x), ref, atol=1e-6, rtol=1e-6)
    # the mask does matter: dropping a real token changes the logits
    fewer = c.mask.clone()
    fewer[0, -1] = False
    assert not torch.allclose(m(Condition.sequence(c.features, fewer), x), ref)


def test_fully_padded_row_gives_zero_cross_attention_not_nan():
    """Bug: softmax over keys that are all masked gives NaN (some SDPA kernels), or a row with no
    condition token still gets the projection's bias."""
    attn = CrossAttention(16, 2)
    attn.proj.bias.data.fill_(0.1)  # a row with nothing to attend to must not even add the bias
    kv = attn.keys_values(torch.randn(2, 3, 16), torch.tensor([[True, False, False], [False] * 3]))
    out = attn(torch.randn(2, 5, 16), kv)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0 and out[0].abs().max() > 0


def test_wrong_condition_gets_a_clear_error():
    """Bug: a condition of the wrong kind, size or batch broadcast or crash inside a matmul."""
    m, t = model(), tok()
    _, x = teacher(t, 3)
    with pytest.raises(ValueError, match="takes sequence conditions.*got a vector"):
        m(Condition.vector(torch.randn(3, D)), x)
    with pytest.raises(ValueError, match="feature size D = 5 does not match the model's cond_dim = 6"):
        m(Condition.sequence(torch.randn(3, 2, 5)), x)
    with pytest.raises(ValueError, match="batch size 2 but the input has batch size 3"):
        m(seq(2), x)
    with pytest.raises(ValueError, match=r"pass msar.Condition.sequence"):
        m(torch.tensor([0, 1, 2]), x)
    with pytest.raises(ValueError, match="takes classes conditions"):
        model("classes")(seq(), x)
    with pytest.raises(ValueError, match="pass condition=, not labels"):
        sample(m, t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="batch_size 2 differs"):
        sample(m, t, batch_size=2, condition=seq(3))
    with pytest.raises(ValueError, match="num_classes must be 0"):
        model("vector", num_classes=3)
    with pytest.raises(ValueError, match="cross_attention needs"):
        model("classes", cross=True)


# ---------------------------------------------------------------------------- null condition and guidance
def test_null_condition_ignores_the_condition_and_dropout_uses_it():
    """Bug: the unconditional branch still sees the condition (guidance would cancel out), or
    condition dropout in training does nothing for non-class conditions."""
    for kind in ("vector", "sequence"):
        m, t = model(kind), tok()
        _, x = teacher(t, 3)
        a, b = random_condition(m, 3, seed=0), random_condition(m, 3, seed=1)
        null = torch.ones(3, dtype=torch.bool)
        assert torch.equal(m(a, x, null_rows=null), m(b, x, null_rows=null))
        assert not torch.allclose(m(a, x), m(a, x, null_rows=null))
        m.train()
        m.cond_drop_rate = 1.0
        assert torch.equal(m(a, x), m.eval()(a, x, null_rows=null))


def _greedy_guided_logits(m, t, cond, out, cfg, schedule):
    """Per scale, VAR's guided logits ``(1 + t) cond - t uncond`` (written out here, not the
    sampler's function) from two separate teacher-forced passes."""
    from msar.sampling import guidance_strength
    x = t.teacher_forcing_input(out.indices)
    c = m(cond, x)
    u = m(cond, x, null_rows=torch.ones(cond.batch_size, dtype=torch.bool))
    K, sl = len(m.schedule), m.schedule.slice
    ts = [guidance_strength(cfg, m.schedule.progress(k), schedule) for k in range(K)]
    return [(1 + ts[k]) * c[:, sl(k)] - ts[k] * u[:, sl(k)] for k in range(K)]


@pytest.mark.parametrize("cfg,schedule", [(0.0, "linear"), (3.0, "constant"), (2.0, "linear")])
def test_guided_sampling_follows_vars_formula_with_the_null_branch(cfg, schedule):
    """Bug: guidance uses another unconditional half (the condition itself, no null condition),
    another formula, or cfg=0 still mixes in the null branch. Greedy tokens must be the argmax of
    ``(1 + t) cond - t uncond`` computed from two separate full forwards."""
    m, t = model(), tok()
    cond = seq()
    out = sample(m, t, condition=cond, cfg=cfg, cfg_schedule=schedule, top_k=1)
    for k, logits in enumerate(_greedy_guided_logits(m, t, cond, out, cfg, schedule)):
        assert torch.equal(out.indices[k], logits.argmax(-1)), f"scale {k}"
    if cfg:  # the check can fail: the unguided argmax differs from the guided one somewhere
        plain = _greedy_guided_logits(m, t, cond, out, 0.0, schedule)
        assert any(not torch.equal(out.indices[k], plain[k].argmax(-1)) for k in range(1, 3))


def test_cross_keys_values_are_computed_once_per_generation(monkeypatch):
    """Bug: cross-attention keys / values recomputed at every scale (K times the work)."""
    m, t = model(), tok()
    calls = []
    real = CrossAttention.keys_values
    monkeypatch.setattr(CrossAttention, "keys_values", lambda self, *a: calls.append(1) or real(self, *a))
    sample(m, t, condition=seq(), cfg=2.0, seed=0)
    assert len(calls) == m.depth


# ---------------------------------------------------------------------------- sampler features
def test_editing_acceleration_and_unconditional_sampling_with_a_condition():
    """Bug: known tokens, accel modes or unconditional sampling break for a non-class condition."""
    m, t = model(), tok()
    cond = seq()
    ref = sample(m, t, condition=cond, cfg=2.0, seed=5)
    same = sample(m, t, condition=cond, cfg=2.0, seed=5, accel=Acceleration())  # exact by default
    assert all(torch.equal(a, b) for a, b in zip(ref.indices, same.indices)) and ref.labels is None
    known = [torch.randint(0, V, i.shape) for i in ref.indices]
    mask = [torch.rand(i.shape) < 0.5 for i in ref.indices]
    ed = sample(m, t, condition=cond, cfg=2.0, seed=5, known=known, known_mask=mask)
    assert all(torch.equal(e[mk], k[mk]) for e, k, mk in zip(ed.indices, known, mask))
    # guidance off at every scale: the conditional rows alone (a wrong row slice of the cross keys /
    # values would hand the null condition's to the conditional half)
    off = sample(m, t, condition=cond, cfg=2.0, seed=5, accel=Acceleration(guidance_off_last=3))
    plain = sample(m, t, condition=cond, cfg=0.0, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(off.indices, plain.indices))
    small = model(seed=1, depth=1)
    fast = sample(m, t, condition=cond, cfg=2.0, seed=5,
                  accel=Acceleration(guidance_off_last=1, prune_last=1, refiner=small, refine_last=1))
    assert [i.shape for i in fast.indices] == [i.shape for i in ref.indices]
    # the refiner builds its own condition, null half and cross keys / values: refining every scale is
    # sampling with the refiner alone
    every = sample(m, t, condition=cond, cfg=2.0, seed=5, accel=Acceleration(refiner=small, refine_last=3))
    alone = sample(small, t, condition=cond, cfg=2.0, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(every.indices, alone.indices))
    with pytest.raises(ValueError, match="cond_dim"):
        sample(m, t, condition=cond, accel=Acceleration(refiner=model(seed=1, cond_dim=5), refine_last=1))
    # batch_size alone: the null condition; greedy tokens are the argmax of the null-row forward
    free = sample(m, t, batch_size=2, top_k=1)
    null = m(cond[:2], t.teacher_forcing_input(free.indices), null_rows=torch.ones(2, dtype=torch.bool))
    assert all(torch.equal(i, null[:, m.schedule.slice(k)].argmax(-1)) for k, i in enumerate(free.indices))
    assert sample(quantize_int8(m), t, condition=cond, cfg=2.0, seed=5).indices[-1].shape == (3, 9)
    positional = sample(m, t, cond, cfg=2.0, seed=5)  # a Condition in the labels slot is the condition
    assert all(torch.equal(a, b) for a, b in zip(ref.indices, positional.indices))


def test_edit_keeps_the_known_region_of_the_decoded_data_under_any_condition():
    """Bug: known tokens not forced for a vector / sequence condition (or only in one half of
    guidance), so an edit moves the kept region of the decoded data; or the condition does not
    reach the regenerated region. On decoded data, with any-overlap masks over a pointwise decoder
    (as test_editing_masks does for class labels)."""
    from msar.editing import known_masks
    from test_conformance import sphere_data, sphere_pyramid, sphere_tokenizer

    t = sphere_tokenizer(sphere_pyramid())
    ref_idx = t.encode(sphere_data(2))
    ref = t.decode(ref_idx)
    keep = (torch.arange(96) // 16 < 3).expand(2, 96)  # faces 0-2 of the cube sphere
    kept = keep[:, None, :].expand_as(ref)
    masks = known_masks(t.quantizer.pyramid, keep, threshold=1e-3)
    for kind in ("vector", "sequence"):
        m = tiny_transformer(t, depth=2, embed_dim=32, cond_kind=kind, cond_dim=D)
        outs = [sample(m, t, condition=random_condition(m, 2, seed=s), cfg=2.0, seed=0, known=ref_idx,
                       known_mask=masks).data for s in (0, 1)]
        for out in outs:
            torch.testing.assert_close(out[kept], ref[kept], atol=1e-5, rtol=0)
            assert (out[~kept] - ref[~kept]).abs().max() > 1e-3  # the rest is generated
        assert (outs[0][~kept] - outs[1][~kept]).abs().max() > 1e-3, f"{kind}: the condition changes nothing"


def test_conformance_kit_runs_with_conditioned_models():
    """Bug: the kit only knows class labels, so a conditioned model is never checked."""
    t = tok()
    data = torch.randn(3, C, 3, 3)
    for kind in ("vector", "sequence"):
        rep = check_adapter(t, data, model=model(kind))
        assert {"kv_cache", "sampling"} <= set(rep["checks"])


# ---------------------------------------------------------------------------- training batches
def test_trainer_takes_condition_batches_from_the_default_loader():
    """Bug: (x, features, mask) batches misread as labels, or the condition never reaches the model."""
    m, t = model(cond_drop_rate=0.0), tok()
    m.train()
    c = seq(4)
    x = torch.randn(4, C, 3, 3)
    ds = torch.utils.data.TensorDataset(x, c.features, c.mask)
    raw = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    tr = TransformerTrainer(m, t, TransformerTrainConfig(lr=1e-3, total_steps=2, warmup_steps=0, device="cpu"))
    batch = tr.parse_batch(raw)
    assert isinstance(batch[1], Condition) and torch.equal(batch[1].mask, c.mask)
    assert tr.parse_batch((x, c))[1].features.equal(c.features)
    loss = tr.compute_loss(batch).loss
    shuffled = Condition.sequence(c.features.flip(0), c.mask.flip(0))
    assert torch.isfinite(loss) and loss != tr.compute_loss(tr.parse_batch((x, shuffled))).loss
    assert tr.train_step(x, c) is not None
    with pytest.raises(ValueError, match=r"takes sequence conditions.*a batch is \(x, features \(B, T, D\)"):
        tr.parse_batch((x, torch.tensor([0, 1, 2, 0])))  # class labels for a sequence model


def test_sample_output_holds_the_final_decode_state_for_a_conditioned_model():
    """Bug: the output's ``state`` is a fresh or another state, not the one the scales were added to (the
    class-model path is covered by the triangulation test of refused splits)."""
    m, t = model(), tok()
    out = sample(m, t, condition=seq(), top_k=1)
    assert len(out.state.indices) == len(out.indices)
    assert all(torch.equal(a, b) for a, b in zip(out.state.indices, out.indices))
    assert torch.equal(t.finish(out.state), out.data)
