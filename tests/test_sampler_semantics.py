"""The sampler's steps against their exact distributions, and editing checked on the decoded data.

Each distribution test draws many seeded tokens and runs a chi-square test against the softmax
of the formula, computed here independently of the implementation (numpy, explicit sorting).
Seeds are fixed, so the tests are deterministic; the threshold only has to separate "right
formula" from "wrong formula", which the large draw counts make easy.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy.stats import chisquare

import msar
from msar import (MultiScaleResidualQuantizer, MultiScaleVQTokenizer, NextScaleTransformer, TransformerConfig,
                  sample)
from msar.sampling import (apply_guidance, draw, filter_top_k_top_p, guidance_strength, gumbel_smoothing,
                           sample_tokens, top_k_top_p_candidates)

N_DRAWS = 20000
P_MIN = 1e-3  # a correct sampler passes with these fixed seeds; every broken variant scores ~0


# ---------------------------------------------------------------------------- reference formulas
def reference_probs(logits: np.ndarray, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) restricted to the top-k, then to the smallest most-likely prefix
    whose (renormalised) mass reaches top_p -- the token that crosses top_p is in the prefix."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros_like(z, dtype=bool)
    keep[order[:top_k] if 0 < top_k < len(z) else order] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    if 0 < top_p < 1:
        mass, nucleus = 0.0, np.zeros_like(keep)
        for i in order:
            if not keep[i] or mass >= top_p:
                break
            nucleus[i] = True
            mass += p[i]
        p = np.where(nucleus, p, 0.0)
        p /= p.sum()
    return p


def assert_matches(draws: torch.Tensor, probs: np.ndarray, what: str) -> None:
    """Chi-square of token counts against ``probs``; tokens of probability 0 must never appear."""
    counts = np.bincount(draws.flatten().numpy(), minlength=len(probs)).astype(np.float64)
    zero = np.asarray(probs) == 0
    assert counts[zero].sum() == 0, f"{what}: drew tokens {np.nonzero(counts * zero)[0].tolist()} of probability 0"
    probs = np.asarray(probs, dtype=np.float64)
    if (~zero).sum() == 1:  # one token left (a tight filter): the test above was the whole check
        return                # (a chi-square with one cell has no degrees of freedom: p = nan)
    expected = probs[~zero] / probs[~zero].sum() * counts.sum()
    p_value = chisquare(counts[~zero], expected).pvalue
    assert p_value > P_MIN, f"{what}: counts {counts.tolist()} vs expected {np.round(probs * counts.sum()).tolist()} " \
                            f"(chi-square p = {p_value:.2e})"


LOGITS = torch.tensor([2.0, 1.2, 0.7, 0.3, -0.4, -1.0, -2.5, 0.9])


def many(logits: torch.Tensor) -> torch.Tensor:
    """The same logits at N_DRAWS positions: ``(1, N_DRAWS, V)``."""
    return logits.expand(1, N_DRAWS, -1).contiguous()


# ---------------------------------------------------------------------------- each step alone
@pytest.mark.parametrize("top_k, top_p, temperature", [
    (0, 0.0, 1.0), (0, 0.0, 0.5), (0, 0.0, 2.0), (3, 0.0, 1.0), (0, 0.7, 1.0), (5, 0.8, 1.0), (5, 0.8, 0.7),
])
def test_sample_tokens_matches_the_formula(top_k, top_p, temperature):
    """Catches: temperature inverted or ignored, top-k off by one, a nucleus dropping the token that
    crosses top_p (or keeping one more), top-p computed before top-k renormalisation."""
    g = torch.Generator().manual_seed(0)
    draws = sample_tokens(many(LOGITS), top_k=top_k, top_p=top_p, temperature=temperature, generator=g)
    assert_matches(draws, reference_probs(LOGITS.numpy(), top_k, top_p, temperature),
                   f"top_k={top_k} top_p={top_p} T={temperature}")


def test_nucleus_keeps_the_token_that_crosses_top_p():
    """probs 0.5 / 0.3 / 0.2 with top_p = 0.6: the nucleus is {0, 1} (token 1 crosses 0.6), as in VAR."""
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    kept = torch.isfinite(filter_top_k_top_p(logits, top_p=0.6))
    assert kept.tolist() == [True, True, False]
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=0.5)).tolist() == [True, False, False]
    assert torch.isfinite(filter_top_k_top_p(logits, top_p=0.81)).tolist() == [True, True, True]
    g = torch.Generator().manual_seed(1)
    draws = sample_tokens(many(logits), top_p=0.6, generator=g)
    assert_matches(draws, np.array([0.625, 0.375, 0.0]), "nucleus 0.6")


def test_filter_and_candidates_agree():
    """filter_top_k_top_p is the candidates scattered back: one implementation of both filters."""
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 40)
    for k, p in [(0, 0.0), (5, 0.0), (0, 0.5), (7, 0.9), (40, 0.3)]:
        f = filter_top_k_top_p(logits, k, p)
        vals, ids = top_k_top_p_candidates(logits, k, p)
        kept = torch.isfinite(vals)
        ref = np.stack([reference_probs(r, k, p) > 0 for r in logits.reshape(-1, 40).numpy()]).reshape(4, 3, 40)
        assert torch.equal(torch.isfinite(f), torch.from_numpy(ref))
        assert torch.equal(f.gather(-1, ids)[kept], logits.gather(-1, ids)[kept])
        assert (vals[..., 0] == logits.amax(-1)).all()  # the most likely token is always a candidate


def test_draw_is_exact_inverse_cdf():
    """draw() over masked candidates: frequencies follow softmax of the finite values, -inf never drawn."""
    vals = torch.tensor([1.0, 0.2, float("-inf"), -0.3, float("-inf")])
    ids = torch.tensor([4, 0, 1, 3, 2])
    g = torch.Generator().manual_seed(2)
    out = draw(vals.expand(1, N_DRAWS, -1), ids.expand(1, N_DRAWS, -1), generator=g)
    p = torch.zeros(5)
    p[ids[torch.isfinite(vals)]] = vals[torch.isfinite(vals)].softmax(-1)
    assert_matches(out, p.double().numpy(), "draw")


def test_greedy_is_argmax_and_draws_nothing():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 50)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(sample_tokens(logits, top_k=1, temperature=0.3, generator=g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)


def test_guidance_formula_and_ramp():
    c, u = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.5, 1.0, 0.5])
    assert torch.equal(apply_guidance(c, u, 2.0), 3 * c - 2 * u)
    assert torch.equal(apply_guidance(c, u, 0.0), c)
    s = msar.ScaleSchedule([1, 4, 16, 64])
    assert [guidance_strength(3.0, s.progress(k)) for k in range(4)] == [0.0, 1.0, 2.0, 3.0]
    assert [guidance_strength(3.0, s.progress(k), "constant") for k in range(4)] == [3.0] * 4
    assert msar.ScaleSchedule([4]).progress(0) == 1.0  # one scale: full guidance, as VAR
    with pytest.raises(ValueError, match="cfg_schedule"):
        guidance_strength(1.0, 0.0, "cosine")


def test_gumbel_smoothing_is_a_softmax_sample():
    """Gumbel-max: the argmax of the smoothed weights is distributed as softmax(logits * (1 + r));
    r = 1/2 (k = 1 of K = 3)."""
    g = torch.Generator().manual_seed(3)
    probs = gumbel_smoothing(many(LOGITS), 0.5, generator=g)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, N_DRAWS))
    assert_matches(probs.argmax(-1), torch.softmax(LOGITS.double() * 1.5, -1).numpy(), "gumbel")


# ---------------------------------------------------------------------------- the whole sampler
SCHED = [(1, 1), (2, 2)]


def tiny(V=8, C=4, classes=3, seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(schedule=SCHED, vocab_size=V, latent_dim=C, num_classes=classes, depth=2,
                            embed_dim=32, num_heads=2)
    model = NextScaleTransformer(cfg).init_weights(init_adaln_gamma=0.5, init_head=3.0, init_std=-1).eval()
    tok = MultiScaleVQTokenizer(nn.Identity(), nn.Identity(), MultiScaleResidualQuantizer(V, C, SCHED))
    return model, tok


def first_scale_logits(model, tok, labels):
    """Teacher-forced logits of scale 0 (they depend on the label only): ``(B, V)``."""
    x = torch.zeros(labels.shape[0], model.schedule.L - model.schedule.first_len, tok.latent_dim)
    with torch.no_grad():
        return model(labels, x, allow_null=True)[:, 0]


@pytest.mark.parametrize("cfg, top_k, top_p, temperature", [(0.0, 0, 0.0, 1.0), (2.0, 0, 0.0, 1.0),
                                                            (2.0, 4, 0.8, 0.7), (-0.5, 0, 0.0, 1.3)])
def test_sample_draws_from_the_guided_filtered_distribution(cfg, top_k, top_p, temperature):
    """End to end: many samples' scale-0 tokens follow softmax(filter(((1 + t) c - t u) / T)) with
    c, u the conditional and null-class logits. Catches guidance turned into a no-op or applied with
    the wrong sign, the null half fed the wrong labels, temperature or filters applied wrongly."""
    model, tok = tiny()
    label = torch.tensor([1])
    c = first_scale_logits(model, tok, label)[0]
    u = first_scale_logits(model, tok, torch.tensor([model.num_classes]))[0]
    assert (c - u).abs().max() > 0.5  # guidance has something to move: the check below can fail
    guided = ((1 + cfg) * c - cfg * u).double().numpy()
    out = sample(model, tok, torch.ones(N_DRAWS // 4, dtype=torch.long), cfg=cfg, cfg_schedule="constant",
                 top_k=top_k, top_p=top_p, temperature=temperature, seed=5, decode=False)
    assert_matches(out.indices[0], reference_probs(guided, top_k, top_p, temperature), f"sample(cfg={cfg})")


def test_guidance_changes_the_samples():
    """With the same seed, guidance on and off give different tokens (a no-op guidance would not)."""
    model, tok = tiny()
    labels = torch.arange(3).repeat(20)
    a = sample(model, tok, labels, cfg=0.0, seed=0, top_k=1)
    b = sample(model, tok, labels, cfg=4.0, cfg_schedule="constant", seed=0, top_k=1)
    assert any(not torch.equal(x, y) for x, y in zip(a.indices, b.indices))


# ---------------------------------------------------------------------------- editing, on the decoded data
def test_edit_forced_tokens_reach_the_decoder():
    """Known tokens must be what the decoder sees, not only what sample() returns: the decoded data
    equals decode(returned indices), and forcing every token reproduces decode(reference)."""
    model, tok = tiny(V=16)
    ref = tok.encode(torch.randn(4, 4, 2, 2))
    labels = torch.tensor([0, 1, 2, 0])
    full = [torch.ones_like(i, dtype=torch.bool) for i in ref]
    for smooth in (False, True):
        out = sample(model, tok, labels, known=ref, known_mask=full, seed=0, top_k=8, more_smooth=smooth)
        assert all(torch.equal(a, b) for a, b in zip(out.indices, ref))
        torch.testing.assert_close(out.data, tok.decode(ref), atol=1e-6, rtol=0)
    free = sample(model, tok, labels, seed=0, top_k=8)
    assert not torch.allclose(free.data, tok.decode(ref))  # the forced result is not what it samples anyway
    # half the finest tokens known: the decoded data is the decode of the mixed indices
    half = [torch.zeros_like(ref[0], dtype=torch.bool), torch.tensor([True, False, True, False]).expand(4, 4)]
    out = sample(model, tok, labels, known=ref, known_mask=half, seed=1, top_k=8)
    assert torch.equal(out.indices[1][half[1]], ref[1][half[1]])
    torch.testing.assert_close(out.data, tok.decode(out.indices), atol=1e-6, rtol=0)


def test_null_class_is_not_a_label():
    """label == num_classes is the null class (guidance, dropout): asking for it is an error that
    states the valid range."""
    model, tok = tiny()
    with pytest.raises(ValueError, match=r"0, 2\]|\[0, 3\)"):
        sample(model, tok, [0, 3])
