"""The approximate sampling modes of msar.acceleration: off is exact, on is reproducible, and
each mode does what it says (rows dropped, refiner prefilled, only pivotal tokens recomputed,
int8 layers)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from msar import MultiScaleResidualQuantizer, MultiScaleVQTokenizer, sample
from msar.acceleration import Acceleration, parent_positions, pivotal_tokens, quantize_int8
from msar.schedule import ScaleSchedule
from msar.testing import tiny_transformer

SCHED = [(1, 1), (2, 2), (3, 3), (4, 4)]
K = len(SCHED)


def setup(classes=3, V=16):
    tok = MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(V, 4, SCHED))
    model = tiny_transformer(tok, num_classes=classes, depth=2)
    refiner = tiny_transformer(tok, num_classes=classes, depth=1, embed_dim=16, seed=1)
    return tok, model, refiner


LABELS = torch.tensor([0, 1, 2, 1, 0, 2])
KNOBS = [dict(cfg=2.0, top_k=5, top_p=0.9), dict(cfg=0.0, top_k=0), dict(cfg=1.5, cfg_schedule="constant", top_k=1)]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.indices, b.indices))


def rows_per_call(model):
    """Record ``(rows, tokens)`` of every call of the model's first block."""
    seen = []
    handle = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[:2])))
    return seen, handle


# ---------------------------------------------------------------------------- off = exact
@pytest.mark.parametrize("knobs", KNOBS)
def test_modes_off_are_the_exact_sampler(knobs):
    """Catches: the accelerated loop diverging from msar.sample's (guidance at t = 0, positions,
    caches) when no mode is on, or a mode switched on by its 'off' value (keep = 1, n = 0)."""
    tok, model, _ = setup()
    exact = sample(model, tok, LABELS, seed=3, **knobs)
    for accel in (Acceleration(), Acceleration(guidance_off_last=0, prune_last=0),
                  Acceleration(prune_last=K, prune_keep=1.0)):
        assert same(sample(model, tok, LABELS, seed=3, accel=accel, **knobs), exact), accel


def test_modes_off_are_exact_with_adapter_positions():
    """Catches: per-sample extra_pos not repeated for the unconditional half in the accelerated path."""
    tok, model, _ = setup()
    extra = torch.randn(len(LABELS), model.seq_len, model.embed_dim)
    exact = sample(model, tok, LABELS, seed=0, cfg=2.0, top_k=4, extra_pos=extra)
    assert same(sample(model, tok, LABELS, seed=0, cfg=2.0, top_k=4, extra_pos=extra, accel=Acceleration()), exact)


# ---------------------------------------------------------------------------- on = reproducible, and different
def all_on(refiner):
    return [Acceleration(guidance_off_last=2), Acceleration(refiner=refiner, refine_last=2),
            Acceleration(prune_last=2, prune_keep=0.4),
            Acceleration(guidance_off_last=1, refiner=refiner, refine_last=2, prune_last=1, prune_keep=0.5)]


def test_modes_on_are_seeded_reproducible_and_change_the_result():
    """Catches: a mode drawing unseeded randomness, or a mode that silently does nothing."""
    tok, model, refiner = setup()
    for knobs in KNOBS[:2]:
        for accel in all_on(refiner):
            if knobs["cfg"] == 0 and accel.guidance_off_last and accel.refiner is None:
                continue  # nothing to switch off without guidance
            # adapter positions (in the model's width) with every mode but a narrower refiner's
            extra = None if accel.refiner is not None else torch.randn(1, model.seq_len, model.embed_dim)
            exact = sample(model, tok, LABELS, seed=5, extra_pos=extra, **knobs)
            a = sample(model, tok, LABELS, seed=5, extra_pos=extra, accel=accel, **knobs)
            b = sample(model, tok, LABELS, seed=5, extra_pos=extra, accel=accel, **knobs)
            assert same(a, b), accel
            assert not same(a, exact), accel
            assert all(torch.equal(x, y) for x, y in zip(a.indices[:K - 2], exact.indices[:K - 2])), \
                "scales before every mode starts must be the exact sampler's"


# ---------------------------------------------------------------------------- mechanics
def test_guidance_off_drops_the_unconditional_rows():
    """Catches: the unconditional half still computed (no speed-up) or dropped too early."""
    tok, model, _ = setup()
    seen, h = rows_per_call(model)
    sample(model, tok, LABELS, seed=0, cfg=2.0, accel=Acceleration(guidance_off_last=2))
    h.remove()
    B = len(LABELS)
    assert [r for r, _ in seen] == [2 * B, 2 * B, B, B]


def test_guidance_off_scales_use_the_conditional_logits():
    """Catches: the switched-off scales still mixing in (stale) unconditional logits. Greedy with
    guidance off at every scale equals greedy sampling without guidance."""
    tok, model, _ = setup()
    a = sample(model, tok, LABELS, top_k=1, cfg=3.0, accel=Acceleration(guidance_off_last=K))
    b = sample(model, tok, LABELS, top_k=1, cfg=0.0)
    assert same(a, b)


def test_refiner_is_prefilled_with_the_draft_tokens():
    """Catches: a refiner whose KV caches miss the coarse scales (or hold other tokens than the
    draft's), and a draft that is not the model's exact sampler on the coarse scales. Greedy, no
    guidance: the coarse scales are the draft's exact tokens and every refined scale is the
    argmax of the refiner's teacher-forced logits on the returned tokens."""
    tok, model, refiner = setup()
    seen, h = rows_per_call(refiner)
    out = sample(model, tok, LABELS, top_k=1, cfg=0.0, accel=Acceleration(refiner=refiner, refine_last=2))
    h.remove()
    assert len(seen) == K  # the refiner ran on every scale (the coarse ones to fill its caches)
    exact = sample(model, tok, LABELS, top_k=1, cfg=0.0)
    assert all(torch.equal(x, y) for x, y in zip(out.indices[:2], exact.indices[:2]))
    with torch.no_grad():
        tf = refiner(LABELS, tok.teacher_forcing_input(out.indices))
    for k in (2, 3):
        assert torch.equal(tf[:, model.schedule.slice(k)].argmax(-1), out.indices[k]), k


def test_refiner_must_share_the_tokenizer():
    """Catches: a refiner over another vocabulary or schedule accepted (garbage tokens)."""
    tok, model, _ = setup()
    other = MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(8, 4, SCHED))
    with pytest.raises(ValueError, match="vocab_size"):
        sample(model, tok, LABELS, accel=Acceleration(refiner=tiny_transformer(other, num_classes=3), refine_last=1))
    with pytest.raises(ValueError, match="width"):
        sample(model, tok, LABELS, extra_pos=torch.zeros(1, model.seq_len, model.embed_dim),
               accel=Acceleration(refiner=tiny_transformer(tok, num_classes=3, embed_dim=16), refine_last=1))
    with pytest.raises(ValueError, match="refine_last"):
        Acceleration(refiner=model)
    with pytest.raises(ValueError, match="prune_keep"):
        Acceleration(prune_last=1, prune_keep=0.0)


def test_pruning_recomputes_only_the_pivotal_tokens():
    """Catches: pruning that still runs every token, recomputes other tokens than the pivotal
    ones, or restores pruned positions from the wrong coarse position. Greedy, guidance on:
    the transformer sees ceil(keep n_k) tokens at the pruned scale, and every pruned position
    takes the token of its parent at the previous scale (the same logits' argmax)."""
    tok, model, _ = setup()
    seen, h = rows_per_call(model)
    out = sample(model, tok, LABELS, top_k=1, cfg=2.0, accel=Acceleration(prune_last=1, prune_keep=0.25))
    h.remove()
    B = len(LABELS)
    assert seen == [(2 * B, 1), (2 * B, 4), (2 * B, 9), (2 * B, 4)]
    # which positions were recomputed: the pivotal tokens of the last scale's input
    x = tok.teacher_forcing_input(out.indices)[:, -16:]
    keep = pivotal_tokens(x, 4)
    pruned = torch.ones(B, 16, dtype=torch.bool).scatter(1, keep, False)
    parent_tok = out.indices[2][:, parent_positions(model.schedule, 3)]
    assert torch.equal(out.indices[3][pruned], parent_tok[pruned])
    assert not torch.equal(out.indices[3][~pruned], parent_tok[~pruned])  # the recomputed ones are not copies


def test_pivotal_tokens_are_the_farthest_from_the_mean():
    """Catches: the smallest deviations kept instead of the largest, or the mean taken over the
    wrong axis (channels instead of positions)."""
    x = torch.zeros(2, 5, 3)
    x[0, 3] = 4.0
    x[0, 1] = 3.0  # mean 1.4: position 1 lies 1.6 from it, the zeros 1.4
    x[1, 0] = -3.0
    x[1, 4, 0] = 1.0
    assert pivotal_tokens(x, 2).tolist() == [[1, 3], [0, 4]]


@pytest.mark.parametrize("scales", [[(2, 2), (4, 4)], [(2, 3), (3, 5)], [(1, 2, 2), (2, 3, 4)]])
def test_parent_positions_is_nearest_neighbour_upsampling(scales):
    """Catches: a row/column mix-up or an off-by-one in the coarse -> fine position map."""
    s = ScaleSchedule(scales)
    coarse = torch.arange(s.token_counts[0], dtype=torch.float).view(1, 1, *scales[0])
    up = F.interpolate(coarse, size=scales[1], mode="nearest").reshape(-1).long()
    assert torch.equal(parent_positions(s, 1), up)
    assert parent_positions(ScaleSchedule([2, 6]), 1).tolist() == [0, 0, 0, 1, 1, 1]


def test_int8_copy_quantises_every_linear_layer_and_samples():
    """Catches: linear layers left in float (no speed-up), the q/v biases lost when the fused QKV
    projection is quantised, or the float model modified in place."""
    tok, model, _ = setup()
    for b in model.blocks:  # non-zero q/v biases (VAR initialises them to 0)
        b.attn.q_bias.data.normal_()
        b.attn.v_bias.data.normal_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation notice of quantize_per_tensor
        q = quantize_int8(model)
    assert not any(type(m) is nn.Linear for m in q.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for b, qb in zip(model.blocks, q.blocks):
        zero = torch.zeros_like(b.attn.q_bias)
        assert torch.equal(qb.attn.qkv.bias(), torch.cat((b.attn.q_bias, zero, b.attn.v_bias)))
    x = tok.teacher_forcing_input(sample(model, tok, LABELS, seed=0).indices)
    with torch.no_grad():
        ref, got = model(LABELS, x), q(LABELS, x)
    assert (got - ref).abs().max() / ref.abs().max() < 0.05
    a = sample(q, tok, LABELS, seed=1, cfg=2.0, top_k=5)
    assert same(a, sample(q, tok, LABELS, seed=1, cfg=2.0, top_k=5))


def test_benchmark_smoke(tmp_path):
    """Catches: the benchmark script broken (modes, timing, metrics, report) before a long run."""
    import json

    from benchmarks import acceleration

    res = acceleration.main(["--smoke", "--out", str(tmp_path)])
    with open(res["path"]) as f:
        rec = json.load(f)
    assert {"commit", "command", "date", "machine", "wall_time_s"} <= set(rec["run"])
    modes = {r["mode"]: r for r in rec["modes"]}
    assert modes["exact"]["tokens_equal_to_exact_per_scale"] == [1.0] * 4
    assert modes["exact"]["speed"]["tokens"]["speedup_cpu"] == 1.0
    assert modes["cfg_off_last1"]["tokens_equal_to_exact_per_scale"][:3] == [1.0] * 3  # only the last scale changes
    assert (tmp_path / "acceleration.png").exists() and "| `all` |" in (tmp_path / "README.md").read_text()
