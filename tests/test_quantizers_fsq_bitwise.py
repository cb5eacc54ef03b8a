"""FSQ and bitwise quantizers: the residual quantizer's invariants, the conformance kit, saving,
and the bitwise transformer head (loss, per-bit sampling against the exact formula, KV cache)."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import msar
from msar import (BitwiseQuantizer, FSQQuantizer, MultiScaleVQTokenizer, ResidualDecodeState, from_pretrained,
                  make_quantizer)
from msar.bitwise import bit_cross_entropy, bit_predictions, bits_to_index, index_to_bits
from msar.sampling import sample_bits
from msar.testing import assert_kv_cache_equivalent, check_adapter, tiny_transformer
from test_sampler_semantics import N_DRAWS, assert_matches, reference_probs


@st.composite
def grid_setups(draw):
    rank = draw(st.integers(1, 3))
    K = draw(st.integers(1, 4))
    sides = sorted(draw(st.lists(st.integers(1, 4), min_size=K, max_size=K)))
    return [(s,) * rank for s in sides], draw(st.sampled_from([0, 1, 4])), draw(st.integers(0, 2 ** 16))


def quantizer(kind: str, dim: int, scales, **kw):
    return make_quantizer(kind, dim, scales, **({"levels": (3, 5, 4)} if kind == "fsq" else {"bits": 5}), **kw)


def check_invariants(q, f):
    """Indices in range, per-scale parts sum to the final latent, decode state == teacher forcing."""
    idx = q.encode(f)
    assert [tuple(i.shape) for i in idx] == [(f.shape[0], n) for n in q.schedule.token_counts]
    assert all(i.dtype == torch.long and int(i.min()) >= 0 and int(i.max()) < q.vocab_size for i in idx)
    fhats = q.encode_progression(f)
    steps = q.indices_to_fhat_progression(idx)
    parts = [steps[0]] + [b - a for a, b in zip(steps, steps[1:])]
    torch.testing.assert_close(sum(parts), fhats[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.indices_to_fhat(idx), fhats[-1], atol=1e-5, rtol=1e-5)
    state = ResidualDecodeState(q, f.shape[0], f.device)
    nexts = [n for k, i in enumerate(idx) if (n := state.add_scale(k, i)) is not None]
    if nexts:
        torch.testing.assert_close(torch.cat(nexts, 1), q.teacher_forcing_input(idx))
    torch.testing.assert_close(state.f_hat, fhats[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["fsq", "bitwise"])
@given(setup=grid_setups())
def test_invariants_on_grids(kind, setup):
    """Catches: a lookup that disagrees with encoding (parts would not sum to the encoded latent),
    a decode step that differs from teacher forcing, indices outside [0, V)."""
    scales, share, seed = setup
    torch.manual_seed(seed)
    q = quantizer(kind, 4, scales, share_phi=share)
    with torch.no_grad():
        q.log_gain.normal_(0, 0.5)  # gains away from 1: a gain missing on one path shows
    check_invariants(q, torch.randn(2, 4, *scales[-1]) * 2)


@given(setup=grid_setups())
def test_fsq_more_scales_never_increase_error_without_phi(setup):
    """With odd levels the grid holds 0, and with proj_out = proj_in^T (initialisation) rounding each
    coordinate picks the code nearest to the residual: with phi off, the finest scale (the full grid)
    can only keep or reduce the error (the caveats of the VQ test). Catches rounding to the wrong
    level, a digit/index mismatch, a gain applied on one side only."""
    scales, _, seed = setup
    torch.manual_seed(seed)
    q = FSQQuantizer((5, 3, 7), 4, scales, phi_ratio=0.0)
    with torch.no_grad():
        q.log_gain.normal_(0, 0.5)
    f = torch.randn(3, 4, *scales[-1])
    errs = [(fh - f).pow(2).mean().item() for fh in q.encode_progression(f)]
    if len(errs) > 1:
        assert errs[-1] <= errs[-2] + 1e-6
    assert errs[-1] <= f.pow(2).mean().item() + 1e-6


def test_more_scales_reduce_error_with_trained_like_gains():
    """Gains that shrink with the scale (what training learns): every added scale reduces the error
    of FSQ and bitwise codes on a fixed input. Catches a residual that is not subtracted."""
    torch.manual_seed(0)
    scales = [(1, 1), (2, 2), (4, 4), (8, 8)]
    f = torch.randn(4, 6, 8, 8)
    for q in (FSQQuantizer((7, 7, 7, 7, 7, 7), 6, scales, phi_ratio=0.0), BitwiseQuantizer(6, 6, scales, phi_ratio=0.0)):
        with torch.no_grad():
            q.log_gain.copy_(torch.tensor([0.5, 0.0, -0.5, -1.0]) + (1.0 if isinstance(q, BitwiseQuantizer) else 0.0))
        errs = [(fh - f).pow(2).mean().item() for fh in q.encode_progression(f)]
        assert all(b < a for a, b in zip(errs, errs[1:])), (type(q).__name__, errs)


@pytest.mark.parametrize("q", [BitwiseQuantizer(5, 6, [(3, 3)], phi_ratio=0.0),
                               FSQQuantizer((5, 2, 4), 6, [(3, 3)], phi_ratio=0.0)], ids=["bitwise", "fsq"])
def test_encoding_picks_the_nearest_of_all_codes(q):
    """While proj_out = proj_in^T (initialisation), the code of each token is the nearest of all V
    codes in latent space: checked against brute force. Catches a flipped bit order or sign, rounding
    to the wrong FSQ level (floor instead of round), a gain applied on one side only."""
    torch.manual_seed(1)
    with torch.no_grad():
        q.log_gain.fill_(0.7)
    z = torch.randn(2, 6, 3, 3)
    idx = q.encode(z)[0]
    all_codes = q.lookup(torch.arange(q.vocab_size).view(-1, 1).expand(-1, 9), 0)[:, :, 0, 0]  # (V, C)
    tokens = z.flatten(2).transpose(1, 2).reshape(-1, 6)
    brute = torch.cdist(tokens, all_codes).argmin(1)
    assert torch.equal(idx.reshape(-1), brute)


@given(st.integers(1, 62), st.integers(0, 2 ** 16))
def test_bits_round_trip(bits, seed):
    """Catches an off-by-one shift, or 62-bit indices overflowing."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 2 ** min(bits, 62), (50,), generator=g, dtype=torch.long)
    b = index_to_bits(idx, bits)
    assert b.shape == (50, bits) and int(b.min()) >= 0 and int(b.max()) <= 1
    assert torch.equal(bits_to_index(b), idx)


@pytest.mark.parametrize("kind", ["fsq", "bitwise"])
def test_soft_codes_of_one_hot_probabilities_are_the_codes(kind):
    """embed_probs of a one-hot distribution is lookup (Gumbel smoothing path); for bitwise, so is
    embed_bit_probs of the token's bits. Catches a value table built in another order than lookup."""
    torch.manual_seed(0)
    q = quantizer(kind, 4, [(2, 2)])
    idx = torch.randint(0, q.vocab_size, (3, 4))
    hard = q.lookup(idx, 0)
    torch.testing.assert_close(q.embed_probs(nn.functional.one_hot(idx, q.vocab_size).float(), 0), hard)
    if kind == "bitwise":
        torch.testing.assert_close(q.embed_bit_probs(index_to_bits(idx, q.bits).float(), 0), hard)


@pytest.mark.parametrize("kind", ["fsq", "bitwise"])
def test_training_forward_trains_projection_gain_and_phi(kind):
    """Straight-through through the rounding: proj_in, proj_out, the gains and phi get gradients from
    the loss, the encoder only through f_hat. Catches an STE that detaches proj_in (it would never learn)."""
    torch.manual_seed(0)
    q = quantizer(kind, 4, [(1, 1), (2, 2), (4, 4)])
    f = torch.randn(2, 4, 4, 4, requires_grad=True)
    out = q(f)
    torch.testing.assert_close(out.f_hat, q.indices_to_fhat(out.indices), atol=1e-5, rtol=1e-5)
    out.f_hat.sum().backward(retain_graph=True)
    assert torch.equal(f.grad, torch.ones_like(f))  # straight-through: the identity to the encoder
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in q.parameters())
    out.loss.backward()
    for name in ("proj_in.weight", "proj_out.weight", "log_gain", "phi.convs.0.conv.weight"):
        assert dict(q.named_parameters())[name].grad.abs().sum() > 0, name


def test_bitwise_usage_is_bit_entropy():
    """hits count 0s and 1s per bit; usage = mean binary entropy (100 % = fair bits). Catches rows swapped
    or the entropy of the wrong axis."""
    q = BitwiseQuantizer(2, 4, [(1, 1), (2, 2)])
    idx = torch.tensor([0, 1, 2, 3])  # both bits fair
    assert torch.equal(q.batch_hits(idx), torch.tensor([[2.0, 2.0], [2.0, 2.0]]))
    q.record_usage(torch.stack([q.batch_hits(torch.tensor([1, 1, 3, 3])), q.batch_hits(idx)]))
    u = q.usage()
    assert u[0] == pytest.approx(50.0) and u[1] == pytest.approx(100.0)  # scale 0: bit 0 always 1, bit 1 fair


# ---------------------------------------------------------------------------- tokenizer level
def tokenizer(kind: str) -> MultiScaleVQTokenizer:
    torch.manual_seed(0)
    q = make_quantizer(kind, 4, [(1, 1), (2, 2), (4, 4)], vocab_size=32)
    return MultiScaleVQTokenizer(nn.Conv2d(1, 4, 1), nn.Conv2d(4, 1, 1), q).eval()


@pytest.mark.parametrize("kind, head", [("vq", "softmax"), ("fsq", "softmax"), ("bitwise", "softmax"),
                                        ("bitwise", "bitwise")])
def test_conformance_kit_passes(kind, head):
    """The whole protocol (pyramid, teacher forcing, finish == decode, KV cache, seeded sampling,
    editing by known tokens) for each quantizer, and the bitwise head on bitwise tokens."""
    tok = tokenizer(kind)
    model = tiny_transformer(tok, num_classes=3, **({"head": "bitwise", "bits": 5} if head == "bitwise" else {}))
    report = check_adapter(tok, torch.randn(3, 1, 4, 4), model=model)
    assert "kv_cache" in report["checks"] and "sampling" in report["checks"]


@pytest.mark.parametrize("kind", ["fsq", "bitwise"])
def test_save_load_round_trip_is_bit_identical(kind, tmp_path):
    """An image tokenizer with each quantizer (one config argument) saves and reloads to identical
    weights, tokens and decoded images. Catches parameters or buffers left out of the state dict
    (a gain or projection re-initialised at loading)."""
    from modalities.image.vqvae import VQVAE, VQVAEConfig
    torch.manual_seed(0)
    vq = VQVAE(VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, patch_nums=(1, 2),
                           using_sa=False, using_mid_sa=False, quantizer=kind)).eval()
    with torch.no_grad():
        vq.quantizer.log_gain.normal_()
        vq.quantizer.record_usage(vq(torch.rand(2, 3, 4, 4))[1].hits)
    vq.save_pretrained(tmp_path)
    back = from_pretrained(tmp_path)
    assert type(back.quantizer) is type(vq.quantizer)
    a, b = vq.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    img = torch.rand(2, 3, 4, 4) * 2 - 1
    idx = vq.encode(img)
    assert all(torch.equal(x, y) for x, y in zip(idx, back.encode(img)))
    assert torch.equal(vq.decode(idx), back.decode(idx))


# ---------------------------------------------------------------------------- bitwise head
BIT_LOGITS = torch.tensor([1.0, -0.5, 0.2])


def reference_bit_token_probs(logits: np.ndarray, top_k: int, top_p: float, temperature: float) -> np.ndarray:
    """Independent bits, each filtered as a two-token distribution (0, l): token probabilities ``(2^d,)``."""
    per_bit = [reference_probs(np.array([0.0, v]), top_k, top_p, temperature) for v in logits]
    d = len(logits)
    return np.array([math.prod(per_bit[j][(t >> j) & 1] for j in range(d)) for t in range(2 ** d)])


@pytest.mark.parametrize("top_k, top_p, temperature", [(0, 0.0, 1.0), (0, 0.0, 0.5), (2, 0.0, 2.0), (0, 0.6, 1.0),
                                                       (0, 0.6, 0.7)])
def test_sample_bits_matches_the_formula(top_k, top_p, temperature):
    """Chi-square of the drawn tokens against the product of per-bit filtered sigmoids. Catches bits
    drawn with the wrong sign, temperature ignored, top-p filtering the likelier bit, bit order
    swapped against bits_to_index."""
    g = torch.Generator().manual_seed(0)
    draws = sample_bits(BIT_LOGITS.expand(1, N_DRAWS, -1).contiguous(), top_k, top_p, temperature, generator=g)
    assert_matches(draws, reference_bit_token_probs(BIT_LOGITS.numpy(), top_k, top_p, temperature),
                   f"bits top_k={top_k} top_p={top_p} T={temperature}")


def test_greedy_bits_and_loss():
    """top_k=1 takes each likelier bit; the BCE is the mean over bits of -log sigmoid(+-l); the
    prediction is the greedy token. Catches a loss on the wrong bits (e.g. reversed bit order)."""
    logits = torch.tensor([[[2.0, -1.0, 0.5]]])
    assert sample_bits(logits, top_k=1).item() == 0b101
    assert bit_predictions(logits).item() == 0b101
    target = torch.tensor([[0b011]])
    # bits 1, 1, 0 of the target: -log sigmoid(l) where the bit is 1, -log sigmoid(-l) where it is 0
    want = (-torch.nn.functional.logsigmoid(torch.tensor([2.0, -1.0, -0.5]))).mean()
    torch.testing.assert_close(bit_cross_entropy(logits, target)[0, 0], want)


def test_bitwise_head_guidance_acts_on_bit_logits():
    """End to end with cfg: scale-0 tokens follow per-bit sigmoids of (1 + t) c - t u. Catches
    guidance skipped or the null half mixed in on the bitwise path."""
    tok = tokenizer("bitwise")
    model = tiny_transformer(tok, num_classes=3, head="bitwise", bits=5, init_head=3.0)
    x = torch.zeros(2, model.schedule.L - model.schedule.first_len, tok.latent_dim)
    with torch.no_grad():
        c, u = model(torch.tensor([1, model.num_classes]), x, allow_null=True)[:, 0]
    cfg = 2.0
    guided = ((1 + cfg) * c - cfg * u).double().numpy()
    out = msar.sample(model, tok, torch.ones(N_DRAWS // 4, dtype=torch.long), cfg=cfg, cfg_schedule="constant",
                      seed=3, decode=False)
    assert_matches(out.indices[0], reference_bit_token_probs(guided, 0, 0.0, 1.0), "bitwise sample(cfg=2)")


def test_bitwise_head_kv_cache_and_trainer():
    """KV-cached bit logits equal the full forward; a trainer step on bitwise tokens lowers the BCE."""
    from msar.training import TransformerTrainConfig, TransformerTrainer
    tok = tokenizer("bitwise")
    model = tiny_transformer(tok, num_classes=3, head="bitwise", bits=5)
    data = torch.randn(4, 1, 4, 4)
    idx = tok.encode(data)
    assert assert_kv_cache_equivalent(model, tok, idx, torch.tensor([0, 1, 2, 0])) <= 1e-5
    trainer = TransformerTrainer(model.train(), tok, TransformerTrainConfig(total_steps=30, lr=3e-3, warmup_steps=0))
    labels = torch.tensor([0, 1, 2, 0])
    first = trainer.train_step(idx, labels)["loss"]
    for _ in range(25):
        last = trainer.train_step(idx, labels)["loss"]
    assert first < 0.8 and last < first * 0.7  # a BCE over bits (ln 2 at chance), and it learns


def test_bitwise_head_config_errors():
    tok = tokenizer("bitwise")
    with pytest.raises(ValueError, match="vocab_size = 2\\^bits"):
        tiny_transformer(tok, head="bitwise", bits=4)
    with pytest.raises(ValueError, match="head must be"):
        tiny_transformer(tok, head="sigmoid")
    model = tiny_transformer(tok, head="bitwise", bits=5)
    with pytest.raises(ValueError, match="more_smooth"):
        msar.sample(model, tok, batch_size=2, more_smooth=True)


def test_make_quantizer_equal_bits():
    """One vocab_size gives every kind the same bits per token."""
    for kind in ("vq", "fsq", "bitwise"):
        assert make_quantizer(kind, 4, [(1, 1)], vocab_size=4096).vocab_size == 4096
    with pytest.raises(ValueError, match="power of 2"):
        make_quantizer("bitwise", 4, [(1, 1)], vocab_size=1000)
    with pytest.raises(ValueError, match="kind"):
        make_quantizer("lfq2", 4, [(1, 1)], vocab_size=16)
    with pytest.raises(ValueError, match="levels"):
        FSQQuantizer((8, 1), 2, [(1, 1)])


def test_benchmark_smoke(tmp_path):
    """benchmarks/quantizers.py --smoke: every variant trains, samples and is measured; the JSON has
    provenance and one row per variant at the same bits per token."""
    from benchmarks import quantizers
    from test_benchmarks import load
    rec = load(quantizers.main(["--smoke", "--threads", "1", "--self-correction", "0.2", "--out", str(tmp_path)]),
               png=False)
    rows = rec["figures"]["rows"]
    assert [(r["quantizer"], r["head"]) for r in rows] == [*quantizers.VARIANTS, quantizers.SELF_CORRECTION]
    assert rows[-1]["self_correction_flip_prob"] == 0.2
    bits = rec["config"]["bits"]
    for r in rows:
        assert r["bits_per_token"] == bits and len(r["test_codes"]["codes_used"]) == len(quantizers.PATCH_NUMS)
        assert all(1 <= u <= 2 ** bits for u in r["test_codes"]["codes_used"])
        assert r["samples"] == 10 * rec["config"]["samples_per_class"] and r["sampling_images_per_s"] > 0
    assert rec["figures"]["table"].count("\n") == len(rows) + 1


def test_bitwise_self_correction_requantizes_the_residual_of_flipped_bits():
    """Targets of scale k are the tokens of the residual that the *flipped* tokens of scales < k
    leave (so the model learns to repair sampling mistakes); the teacher input is built from the
    flipped tokens; with flip_prob 0 it is plain encoding. Catches targets taken from the clean
    encoding, or a teacher input built from the targets."""
    from msar.bitwise import self_correction_batch
    tok = tokenizer("bitwise")
    q = tok.quantizer
    x = torch.randn(6, 1, 4, 4)
    clean, _, tf_clean = self_correction_batch(tok, x, None, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(clean, tok.encode(x)))
    torch.testing.assert_close(tf_clean, tok.teacher_forcing_input(clean))
    f = tok.encode_latent(x)
    targets, inputs = q.encode_with_corruption(f, lambda i, k: msar.bitwise.flip_bits(i, q.bits, 0.3,
                                                                                   torch.Generator().manual_seed(k)))
    flipped = torch.cat([(index_to_bits(a, q.bits) != index_to_bits(b, q.bits)).flatten()
                         for a, b in zip(targets, inputs)]).float().mean()
    assert 0.2 < flipped < 0.4
    steps = q.indices_to_fhat_progression(inputs)
    for k in range(1, len(targets)):
        residual = f - steps[k - 1]
        z = msar.to_tokens(q.pyramid.restrict(residual, k)).reshape(-1, q.dim)
        assert torch.equal(q.encode_tokens(z, k).view_as(targets[k]), targets[k]), k
    assert not all(torch.equal(a, b) for a, b in zip(targets, clean))


def test_scale_diagnostic_with_bitwise_head():
    """The teacher-forced loss / accuracy of msar.scale_diagnostic read bit logits as bits (a
    softmax cross-entropy over d 'classes' would fail or mislead). Catches the softmax path used."""
    tok = tokenizer("bitwise")
    model = tiny_transformer(tok, num_classes=0, head="bitwise", bits=5)
    idx = tok.encode(torch.randn(3, 1, 4, 4))
    report = msar.scale_diagnostic(model, tok, idx)
    with torch.no_grad():
        logits = model(torch.zeros(3, dtype=torch.long), tok.teacher_forcing_input(idx), allow_null=True)
    for k, row in enumerate(report):
        lk = logits[:, model.schedule.slice(k)]
        assert row["tf_loss"] == pytest.approx(float(bit_cross_entropy(lk, idx[k]).mean()), rel=1e-5)
        assert row["tf_acc"] == pytest.approx(float((bit_predictions(lk) == idx[k]).float().mean()))


def test_benchmark_voxel_smoke(tmp_path):
    """benchmarks/quantizers.py --modality voxel --smoke: the three voxel tokenizers train and are measured."""
    from benchmarks import quantizers
    from test_benchmarks import load
    rec = load(quantizers.main(["--smoke", "--threads", "1", "--modality", "voxel", "--out", str(tmp_path)]), png=False)
    assert [r["quantizer"] for r in rec["figures"]["rows"]] == ["vq", "fsq", "bitwise"]
    assert all(0 <= r["test_recon_iou"] <= 1 and len(r["test_codes"]["codes_used"]) == 4 for r in rec["figures"]["rows"])
