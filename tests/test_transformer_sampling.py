"""Next-scale transformer and sampler: KV cache = full masked forward, reproducibility,
guidance, top-k / top-p, editing and bad-input errors."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

from msar import (MultiScaleResidualQuantizer, MultiScaleVQTokenizer, NextScaleTransformer, ScaleSchedule,
                  TransformerConfig, filter_top_k_top_p, sample, sample_tokens)


def tiny(schedule, V=16, C=4, classes=3, depth=2, width=32, heads=2, shared=False, l2=True, seed=0, coords=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(schedule=schedule, vocab_size=V, latent_dim=C, num_classes=classes, depth=depth,
                            embed_dim=width, num_heads=heads, shared_aln=shared, attn_l2_norm=l2,
                            init_adaln_gamma=0.5, init_head=1.0, coord_frequencies=coords)  # larger than VAR's: logits that vary
    model = NextScaleTransformer(cfg).eval()
    tok = MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(V, C, schedule))
    return model, tok


@st.composite
def model_setups(draw):
    kind = draw(st.sampled_from(["r1", "r2", "r3"]))
    rank = int(kind[1])
    K = draw(st.integers(1, 4))
    sides = sorted(draw(st.lists(st.integers(1, 4), min_size=K, max_size=K)))
    return ([(s,) * rank for s in sides], draw(st.booleans()), draw(st.booleans()), draw(st.integers(0, 999)))


def cached_logits(model, tok, labels, idx):
    """Scale-by-scale logits with the KV cache, feeding ground-truth tokens."""
    cond, cond_blocks = model.condition(labels)
    caches = model.new_caches(labels.shape[0])
    state = tok.start(labels.shape[0], "cpu")
    h = model.embed_start(cond)
    out = []
    for k, i in enumerate(idx):
        out.append(model.step(h, cond, cond_blocks, caches))
        nxt = state.add_scale(k, i)
        if nxt is not None:
            h = model.embed_scale(nxt, k + 1)
    return torch.cat(out, 1)


@given(model_setups())
def test_kv_cache_equals_full_masked_forward(setup):
    schedule, shared, l2, seed = setup
    model, tok = tiny(schedule, shared=shared, l2=l2, seed=seed)
    B = 2
    x = torch.randn(B, tok.latent_dim, *schedule[-1])
    idx = tok.encode(x)
    labels = torch.tensor([0, 2])
    full = model(labels, tok.teacher_forcing_input(idx))
    inc = cached_logits(model, tok, labels, idx)
    torch.testing.assert_close(inc, full, atol=1e-4, rtol=1e-4)


def test_kv_cache_check_can_fail_without_mask():
    """Sanity of the property: dropping the block-causal mask makes the full pass differ."""
    model, tok = tiny([(1, 1), (2, 2), (3, 3)])
    idx = tok.encode(torch.randn(2, 4, 3, 3))
    labels = torch.tensor([0, 1])
    model.attn_mask = torch.ones_like(model.attn_mask)
    full = model(labels, tok.teacher_forcing_input(idx))
    assert not torch.allclose(cached_logits(model, tok, labels, idx), full, atol=1e-4)


def test_raster_mode_is_causal_next_token():
    cfg = TransformerConfig(schedule=ScaleSchedule.raster(5).to_config(), vocab_size=8, latent_dim=4,
                            depth=1, embed_dim=16, num_heads=2)
    model = NextScaleTransformer(cfg)
    assert model.seq_len == 5 and model.first_len == 1
    assert torch.equal(model.attn_mask, torch.tril(torch.ones(5, 5, dtype=torch.bool)))


SCHED = [(1, 1), (2, 2), (3, 3)]


def test_seeded_sampling_reproduces_and_seeds_differ():
    model, tok = tiny(SCHED, V=64)
    kw = dict(cfg=1.5, top_k=10, top_p=0.9)
    a = sample(model, tok, [0, 1, 2], seed=7, **kw)
    b = sample(model, tok, [0, 1, 2], seed=7, **kw)
    c = sample(model, tok, [0, 1, 2], seed=8, **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))
    assert torch.equal(a.data, b.data)
    assert any(not torch.equal(x, y) for x, y in zip(a.indices, c.indices))


def test_guidance_zero_equals_unguided():
    model, tok = tiny(SCHED, V=64)
    labels = torch.tensor([0, 1, 2, 1])
    g = sample(model, tok, labels, cfg=0.0, seed=3, top_k=20)
    # unguided by hand: run the conditional branch only, same generator draws
    gen = torch.Generator().manual_seed(3)
    cond, cond_blocks = model.condition(labels)
    caches = model.new_caches(4)
    st_ = tok.start(4, "cpu")
    h = model.embed_start(cond)
    for k in range(len(SCHED)):
        idx = sample_tokens(model.step(h, cond, cond_blocks, caches), 20, 0.0, 1.0, gen)
        assert torch.equal(idx, g.indices[k])
        nxt = st_.add_scale(k, idx)
        if nxt is not None:
            h = model.embed_scale(nxt, k + 1)


def test_top_k_one_is_greedy():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50)
    assert torch.equal(sample_tokens(logits, top_k=1), logits.argmax(-1))
    model, tok = tiny(SCHED, V=64)
    a = sample(model, tok, [0, 1], cfg=2.0, top_k=1, seed=1)
    b = sample(model, tok, [0, 1], cfg=2.0, top_k=1, seed=999)
    assert all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))


def test_top_k_top_p_filtering():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 40)
    f = filter_top_k_top_p(logits, top_k=5)
    assert (torch.isfinite(f).sum(-1) == 5).all()
    p = filter_top_k_top_p(logits, top_p=0.5)
    probs = logits.softmax(-1)
    kept_mass = (probs * torch.isfinite(p)).sum(-1)
    assert (kept_mass >= 0.5 - 1e-6).all()
    # the nucleus is minimal: dropping its least likely token goes below top_p
    least = torch.where(torch.isfinite(p), probs, torch.ones_like(probs)).min(-1).values
    assert ((kept_mass - least) < 0.5 + 1e-6).all()
    # samples only ever come from the allowed set
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        s = sample_tokens(logits, top_k=5, top_p=0.8, generator=g)
        allowed = torch.isfinite(filter_top_k_top_p(logits, 5, 0.8))
        assert allowed.gather(-1, s.unsqueeze(-1)).all()


def test_known_tokens_are_preserved_and_rest_sampled():
    model, tok = tiny(SCHED, V=64)
    ref = tok.encode(torch.randn(2, 4, 3, 3))
    masks = [torch.rand(i.shape, generator=torch.Generator().manual_seed(k)) < 0.5 for k, i in enumerate(ref)]
    out = sample(model, tok, [0, 1], known=ref, known_mask=masks, seed=0, top_k=30, cfg=1.0)
    for k, (i, m) in enumerate(zip(out.indices, masks)):
        assert torch.equal(i[m], ref[k][m])
    out_smooth = sample(model, tok, [0, 1], known=ref, known_mask=masks, seed=0, top_k=30, more_smooth=True)
    assert all(torch.equal(i[m], r[m]) for i, r, m in zip(out_smooth.indices, ref, masks))


def test_logits_hook_restricts_tokens_per_scale():
    """The hook sees each scale's logits and the tokens drawn so far; its -inf entries are
    never sampled (graphs use this to forbid padding or another scale's token kinds)."""
    model, tok = tiny(SCHED, V=16)
    seen = []

    def even_on_odd_scales(k, logits, state):
        seen.append((k, tuple(logits.shape), [tuple(t.shape) for t in state.indices]))
        if k % 2:
            logits = logits.clone()
            logits[..., 1::2] = float("-inf")
        return logits

    out = sample(model, tok, [0, 1, 2], seed=0, cfg=2.0, top_p=0.95, logits_hook=even_on_odd_scales)
    counts = ScaleSchedule(SCHED).token_counts
    assert [s[0] for s in seen] == list(range(len(SCHED)))
    assert [s[1] for s in seen] == [(3, n, 16) for n in counts]  # guided: the hook sees the combined logits
    assert [len(s[2]) for s in seen] == list(range(len(SCHED)))
    assert all((out.indices[k] % 2 == 0).all() for k in range(1, len(SCHED), 2))
    assert any((out.indices[k] % 2 == 1).any() for k in range(0, len(SCHED), 2))  # the hook did the filtering
    # identity hook = no hook
    plain = sample(model, tok, [0, 1, 2], seed=0, cfg=2.0, top_p=0.95)
    same = sample(model, tok, [0, 1, 2], seed=0, cfg=2.0, top_p=0.95, logits_hook=lambda k, l, s: l)
    assert all(torch.equal(a, b) for a, b in zip(plain.indices, same.indices))
    with pytest.raises(ValueError, match="no finite logit .* scale 0"):
        sample(model, tok, [0], seed=0, logits_hook=lambda k, l, s: torch.full_like(l, float("-inf")))
    with pytest.raises(ValueError, match="logits_hook must return a tensor"):
        sample(model, tok, [0], seed=0, logits_hook=lambda k, l, s: l[..., :3])


def test_bad_inputs_get_clear_errors():
    model, tok = tiny(SCHED)
    idx = tok.encode(torch.randn(2, 4, 3, 3))
    x = tok.teacher_forcing_input(idx)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, num_classes - 1\] = \[0, 2\]"):
        model(torch.tensor([0, 7]), x)
    with pytest.raises(ValueError, match="batch size 3 but the input has batch size 2"):
        model(torch.tensor([0, 1, 2]), x)
    with pytest.raises(ValueError, match=r"expected shape \(2, 13, 4\)"):
        model(torch.tensor([0, 1]), x[:, :5])
    with pytest.raises(ValueError, match=r"must lie in \[0, num_classes - 1\] = \[0, 2\]"):
        sample(model, tok, [0, 5])
    with pytest.raises(ValueError, match=r"known\[2\]: expected shape \(B, 9\)"):
        sample(model, tok, [0, 1], known=[idx[0], idx[1], idx[2][:, :4]],
               known_mask=[torch.ones_like(i, dtype=torch.bool) for i in idx])
    with pytest.raises(ValueError, match="token index out of range"):
        tok.decode([idx[0], idx[1], idx[2] + 100])
    with pytest.raises(ValueError, match="expected 3 scales, got 2"):
        tok.teacher_forcing_input(idx[:2])
    other_tok = MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(16, 4, [(1, 1), (2, 2)]))
    with pytest.raises(ValueError, match="does not match the model"):
        sample(model, other_tok, [0])


def test_unconditional_model_samples():
    model, tok = tiny(SCHED, classes=0)
    out = sample(model, tok, batch_size=3, seed=0, top_k=5)
    assert out.data.shape == (3, 4, 3, 3) and (out.labels == 0).all()


# ---------------------------------------------------------------------------- model defaults and footguns
def test_construction_applies_var_init_from_the_config():
    """``NextScaleTransformer(cfg)`` is VAR-initialised (PyTorch's default init would give nonzero
    biases, O(1/sqrt(C)) AdaLN gates and a full-size head), with the scales of the config's fields."""
    C, depth = 64, 3
    cfg = TransformerConfig(schedule=SCHED, vocab_size=256, latent_dim=4, num_classes=3, depth=depth,
                            embed_dim=C, num_heads=2)
    torch.manual_seed(0)
    m = NextScaleTransformer(cfg)
    std = (1 / (3 * C)) ** 0.5  # init_std = -1
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear) and mod.bias is not None:
            assert not mod.bias.any(), name
    torch.testing.assert_close(m.head.weight.std().item(), 0.02 * std, rtol=0.1, atol=0)
    for b in m.blocks:
        w = b.adaln_proj[-1].weight
        torch.testing.assert_close(w[:2 * C].std().item(), 1e-5 * std, rtol=0.1, atol=0)  # gates: near identity
        torch.testing.assert_close(w[2 * C:].std().item(), 0.5 * std, rtol=0.1, atol=0)
        torch.testing.assert_close(b.ffn.fc2.weight.std().item(), std / (2 * depth) ** 0.5, rtol=0.1, atol=0)
    # the config's fields drive it; init_weights() re-applies them, arguments override them
    torch.manual_seed(0)
    big = NextScaleTransformer(TransformerConfig(**{**cfg.__dict__, "init_head": 1.0, "init_std": 0.05}))
    torch.testing.assert_close(big.head.weight.std().item(), 0.05, rtol=0.1, atol=0)
    big.init_weights(init_head=0.02)
    torch.testing.assert_close(big.head.weight.std().item(), 0.02 * 0.05, rtol=0.1, atol=0)


def test_null_label_only_when_asked_for():
    """A label equal to num_classes is the null class: rejected (with the valid range) unless the
    caller asks for it, so "labels 1..num_classes" cannot silently train unconditionally."""
    model, tok = tiny(SCHED, classes=4)
    idx = tok.encode(torch.randn(2, 4, 3, 3))
    x = tok.teacher_forcing_input(idx)
    msg = (r"class labels must lie in \[0, num_classes - 1\] = \[0, 3\]; the null class \(4\) is used only for "
           r"guidance / dropout")
    with pytest.raises(ValueError, match=msg):
        model(torch.tensor([1, 4]), x)
    with pytest.raises(ValueError, match=msg):
        sample(model, tok, [4, 0])
    assert model.null_label == 4
    uncond = model(torch.full((2,), model.null_label), x, allow_null=True)
    cond, _ = model.condition(torch.full((2,), 4))
    assert torch.equal(cond, model.class_embed.weight[[4, 4]])  # the null row is what allow_null reaches
    assert not torch.allclose(uncond, model(torch.tensor([0, 0]), x))
    with pytest.raises(ValueError, match=r"\[0, num_classes\] = \[0, 4\] \(4 = the null class\)"):
        model(torch.tensor([0, 5]), x, allow_null=True)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        model(torch.tensor([-1, 0]), x)
    # unconditional models: the null class 0 is the only label, no flag needed
    m0, _ = tiny(SCHED, classes=0)
    assert m0(torch.zeros(2, dtype=torch.long), x).shape == (2, 14, 16)
    with pytest.raises(ValueError, match="unconditional"):
        m0(torch.tensor([0, 1]), x)


def _extra_pos(model, B, seed=0):
    return torch.randn(B, model.seq_len, model.embed_dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rows", [1, 2])
def test_kv_cache_with_extra_pos_equals_full_forward(rows):
    """Adapter positions reach every scale of the incremental path: the KV-cached scale-by-scale
    logits equal the teacher-forced forward with the same ``extra_pos`` (per-sample or shared)."""
    model, tok = tiny([(1, 1), (2, 2), (3, 3)], shared=rows == 2)
    labels = torch.tensor([0, 2])
    idx = tok.encode(torch.randn(2, 4, 3, 3))
    extra = _extra_pos(model, rows)
    full = model(labels, tok.teacher_forcing_input(idx), extra_pos=extra)
    assert not torch.allclose(full, model(labels, tok.teacher_forcing_input(idx)), atol=1e-3)  # it matters
    cond, cond_blocks = model.condition(labels)
    caches = model.new_caches(2)
    state = tok.start(2, "cpu")
    lvl_pos = model.level_pos(extra)
    h = model.embed_start(cond, extra_pos=extra)
    out = []
    for k, i in enumerate(idx):
        out.append(model.step(h, cond, cond_blocks, caches))
        nxt = state.add_scale(k, i)
        if k + 1 < len(idx):
            h = model.embed_scale(nxt, k + 1, extra_pos=extra)
            assert torch.equal(h, model.embed_scale(nxt, k + 1, lvl_pos))  # precomputed = per-call
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=1e-5)


def test_extra_pos_shape_errors():
    model, tok = tiny(SCHED)
    x = tok.teacher_forcing_input(tok.encode(torch.randn(2, 4, 3, 3)))
    with pytest.raises(ValueError, match=r"extra_pos: expected shape \(B or 1, 14, 32\)"):
        model(torch.tensor([0, 1]), x, extra_pos=torch.zeros(2, 13, 32))
    with pytest.raises(ValueError, match="extra_pos has batch size 3"):
        model(torch.tensor([0, 1]), x, extra_pos=torch.zeros(3, 14, 32))
    with pytest.raises(ValueError, match="not both"):
        model.embed_start(model.condition(torch.tensor([0]))[0], model.level_pos(), extra_pos=torch.zeros(1, 14, 32))


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_sample_with_extra_pos_matches_teacher_forcing(cfg):
    """``sample(extra_pos=)`` conditions every scale on the positions: greedy tokens equal the
    argmax of the teacher-forced forward (guided: VAR's formula on the conditional and null
    passes) with the same per-sample ``extra_pos``; catches positions dropped or misaligned in
    the incremental path or in the null half of guidance."""
    from msar import guidance_strength
    model, tok = tiny(SCHED, V=64)
    labels = torch.tensor([0, 2])
    extra = 3 * _extra_pos(model, 2, seed=1)
    out = sample(model, tok, labels, cfg=cfg, top_k=1, extra_pos=extra)
    plain = sample(model, tok, labels, cfg=cfg, top_k=1)
    assert any(not torch.equal(a, b) for a, b in zip(out.indices, plain.indices))
    x = tok.teacher_forcing_input(out.indices)
    logits = model(labels, x, extra_pos=extra)
    if cfg:
        null = model(torch.full_like(labels, model.null_label), x, extra_pos=extra, allow_null=True)
        K = len(SCHED)
        t = [guidance_strength(cfg, model.schedule.progress(k)) for k in range(K)]
        parts = [(1 + t[k]) * logits[:, sl] - t[k] * null[:, sl]
                 for k, sl in enumerate(model.schedule.slice(k) for k in range(K))]
        logits = torch.cat(parts, 1)
    assert torch.equal(torch.cat(out.indices, 1), logits.argmax(-1))
    with pytest.raises(ValueError, match="extra_pos has batch size 3"):
        sample(model, tok, labels, extra_pos=_extra_pos(model, 3))


def test_kv_cache_follows_the_autocast_dtype():
    """Under bf16 autocast the KV cache is bf16 (an fp32 cache doubled the memory: ~40 GB at d30,
    batch 64) and the cached logits and greedy tokens stay close to fp32's."""
    model, tok = tiny([(1, 1), (2, 2), (4, 4)], V=64, width=64, heads=4, seed=3)
    labels = torch.tensor([0, 2, 1, 1])
    idx = tok.encode(torch.randn(4, tok.latent_dim, 4, 4))
    assert {c.k.dtype for c in model.new_caches(4)} == {torch.float32}
    fp32 = cached_logits(model, tok, labels, idx)
    greedy32 = sample(model, tok, labels, cfg=1.5, top_k=1, decode=False).indices
    with torch.autocast("cpu", dtype=torch.bfloat16):
        caches = model.new_caches(4)
        assert {c.k.dtype for c in caches} | {c.v.dtype for c in caches} == {torch.bfloat16}
        bf16 = cached_logits(model, tok, labels, idx)
        greedy16 = sample(model, tok, labels, cfg=1.5, top_k=1, decode=False).indices
    assert bf16.dtype == torch.float32  # logits leave the head in fp32
    err = (bf16 - fp32).abs().max() / fp32.abs().max()
    assert 0 < err < 0.05, f"bf16 logits differ from fp32 by {err:.3g} of their range"
    agree = torch.cat([(a == b).flatten() for a, b in zip(greedy16, greedy32)]).float().mean()
    assert agree >= 0.9, f"greedy tokens under bf16 agree with fp32 at {agree:.2f} of positions"


def test_block_causal_attention_in_pieces_equals_the_masked_attention():
    """The training forward runs its last scales without a mask (BlockCausalMask): same output and
    gradients as one SDPA under the full block-causal mask; a mask that is not block-causal is not split."""
    from msar.models.transformer import BlockCausalMask
    model, _ = tiny([(1, 1), (2, 2), (3, 3), (4, 4)])
    mask = model.attn_mask
    tail = model._unmasked_tail(mask)
    assert tail == (5, 14)  # scales 2 and 3 start at 1 + 4 and 1 + 4 + 9
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, model.seq_len, 8, requires_grad=True) for _ in range(3))
    pieces = BlockCausalMask(mask, tail).attend(q, k, v, 0.0, 0.3)
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(pieces, whole)
    g1 = torch.autograd.grad(pieces.square().sum(), (q, k, v))
    g2 = torch.autograd.grad(whole.square().sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    assert model._unmasked_tail(torch.ones_like(mask)) == ()
    assert model._unmasked_tail(torch.tril(torch.ones_like(mask))) == ()


def test_fourier_features_formula():
    from msar.models.transformer import fourier_features
    c = torch.rand(7, 3)
    f = fourier_features(c, 4)
    j = torch.arange(4, dtype=torch.float32)
    ang = (c[:, :, None] * torch.pi * 2 ** j).reshape(7, 12)  # axis-major, octave-minor
    torch.testing.assert_close(f, torch.cat((ang.sin(), ang.cos()), 1))


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_coordinate_positions_reach_every_path(cfg, tmp_path):
    """``coord_frequencies`` adds the embedded cell centres to the positions of the teacher-forced
    forward, the KV-cached sampler (both halves of guidance) and a saved-and-loaded model:
    greedy samples equal the argmax of the teacher-forced logits, and dropping the coordinate
    term changes them (catches coordinates that one path leaves out)."""
    from msar import from_pretrained, guidance_strength
    model, tok = tiny(SCHED, V=64, coords=3)
    labels = torch.tensor([0, 2])
    out = sample(model, tok, labels, cfg=cfg, top_k=1)
    x = tok.teacher_forcing_input(out.indices)

    def guided(m):
        logits = m(labels, x)
        if not cfg:
            return logits
        null = m(torch.full_like(labels, m.null_label), x, allow_null=True)
        t = torch.cat([torch.full((n,), guidance_strength(cfg, m.schedule.progress(k)))
                       for k, n in enumerate(m.schedule.token_counts)]).view(1, -1, 1)
        return (1 + t) * logits - t * null

    assert torch.equal(torch.cat(out.indices, 1), guided(model).argmax(-1))
    model.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m").eval()
    assert loaded.cfg.coord_frequencies == 3
    assert torch.equal(torch.cat(sample(loaded, tok, labels, cfg=cfg, top_k=1).indices, 1), torch.cat(out.indices, 1))
    with torch.no_grad():
        model.pos_embed_coords.weight.zero_()
    assert not torch.equal(sample(model, tok, labels, cfg=cfg, top_k=1).indices[-1], out.indices[-1])


def test_coordinate_positions_config():
    from msar.training.optim import param_groups
    plain, _ = tiny(SCHED)
    assert plain.pos_embed_coords is None and not any("coords" in n for n, _ in plain.named_parameters())
    model, _ = tiny(SCHED, coords=2)
    decay, no_decay = param_groups(model, 0.05)
    assert "pos_embed_coords.weight" in no_decay["names"] and "pos_embed_coords.weight" not in decay["names"]
    assert model.pos_embed_coords.in_features == 2 * 2 * len(SCHED[0])
    with pytest.raises(ValueError, match="grid scales"):
        tiny([1, 3], coords=2)
    with pytest.raises(ValueError, match="coord_frequencies"):
        tiny(SCHED, coords=-1)


def test_compiled_blocks_share_one_graph_per_scale():
    """Blocks compiled one by one (``compile_blocks``, for faster GPU sampling) must reuse one graph per
    scale shape: a per-block guard (each block's own drop-path rate, or a different module type
    at rate 0) recompiles every block, exhausts dynamo's recompile limit on a deep model and
    leaves the rest running eagerly. In eval mode the drop-path rate is irrelevant. Ten scales, as VAR
    has: more graphs than dynamo's default limit of 8, which compile_blocks raises."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.manual_seed(0)
    sched = [(k, k) for k in range(1, 11)]
    cfg = TransformerConfig(schedule=sched, vocab_size=16, latent_dim=4, num_classes=3, depth=4, embed_dim=32,
                            num_heads=2, drop_path_rate=0.3)  # rates 0, 0.1, 0.2, 0.3 across the blocks
    model = NextScaleTransformer(cfg).eval()
    tok = MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(16, 4, sched))
    eager = sample(model, tok, [0, 1], seed=3, cfg=1.5)
    try:
        assert model.compile_blocks(backend=counting_backend) is model
        compiled = sample(model, tok, [0, 1], seed=3, cfg=1.5)
    finally:
        torch._dynamo.reset()
    assert len(graphs) == len(sched)
    assert all(torch.equal(a, b) for a, b in zip(eager.indices, compiled.indices))
