"""A faster drop-in for :func:`msar.sample` (the proposal of ``benchmarks/proposals/sampling_speed.diff``).

Status: items 1, 3, 4 and 6 below were adopted by the core in commit 8b197fd (the core keeps
VAR's guidance formula instead of the lerp of item 2, so that greedy ties cannot flip); what
remains different here is the lerp and the optional fused MLP (item 5).

Same model, same weights, same math; what changes is only how much work the sampling loop
wastes around the transformer. Measured by ``benchmarks.sampling_throughput`` next to
:func:`msar.sample`:

1. The AdaLN modulation of every block depends on the class only, not on the scale, so it is
   computed once per generation instead of once per block per scale (``depth x K`` small
   matmuls and copies saved).
2. Guidance ``(1 + t) c - t u`` is one ``torch.lerp(u, c, 1 + t)`` instead of three
   full-vocabulary temporaries.
3. Top-k values come sorted (descending) from ``topk``; the nucleus is cut directly on them
   (``cumsum - p < top_p``) instead of re-sorting ascending and scattering a mask back.
4. The token is drawn by inverse CDF from the cumulative sum already computed for top-p: one
   uniform per position instead of ``multinomial``'s exponential per candidate.
5. (optional, ``fused_mlp=True``, CPU) fc1 + tanh-GELU as one oneDNN kernel.
6. At scale 0 the guidance weight is 0 (VAR's linear ramp), so the unconditional half needs
   its KV cache but not its logits: the head runs on the conditional half only.

Greedy decoding (``top_k=1``) gave exactly the tokens of :func:`msar.sample` and of the reference
VAR code for the same weights wherever we checked (benchmarks and tests), but the lerp and the
fused MLP reorder float operations, so an exact tie could in principle flip.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from msar import NextScaleTransformer, guidance_strength


def modulations(model: NextScaleTransformer, cond_blocks: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Per block, the six ``(B, 1, C)`` AdaLN vectors (gamma1, gamma2, scale1 + 1, scale2 + 1, shift1, shift2)."""
    out = []
    for b in model.blocks:
        g1, g2, s1, s2, sh1, sh2 = b.modulation(cond_blocks)
        out.append((g1, g2, s1 + 1, s2 + 1, sh1, sh2))
    return out


def fused_mlp_available() -> bool:
    """oneDNN's linear + GELU(tanh) epilogue fusion (a private op inductor uses on CPU)."""
    try:
        torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


def mlp(ffn, x: torch.Tensor, fused: bool) -> torch.Tensor:
    """``FFN.forward``; with ``fused`` fc1 and the tanh GELU run as one oneDNN kernel (saves a
    full read + write of the ``(B, n, 4C)`` hidden activation; not bitwise identical, ~1e-6)."""
    if not fused:
        return ffn(x)
    h = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), ffn.fc1.weight, ffn.fc1.bias, "gelu", [], "tanh")
    return ffn.fc2(h).view(*x.shape[:-1], -1)


def block_step(b, x: torch.Tensor, mod: tuple[torch.Tensor, ...], cache, fused_mlp: bool = False) -> torch.Tensor:
    """``AdaLNBlock.forward`` in eval mode with precomputed modulation (no drop-path at inference)."""
    g1, g2, s1, s2, sh1, sh2 = mod
    h = b.attn(b.ln_wo_grad(x).mul_(s1).add_(sh1), attn_mask=None, cache=cache)
    x = x + h.mul_(g1)  # same op order as AdaLNBlock: bitwise-identical activations
    h = mlp(b.ffn, b.ln_wo_grad(x).mul_(s2).add_(sh2), fused_mlp)
    return x + h.mul_(g2)


def draw(logits: torch.Tensor, top_k: int, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``(B, n, V)`` logits -> ``(B, n)`` tokens: greedy for ``top_k == 1``, else top-k / top-p by inverse CDF."""
    B, n, V = logits.shape
    if top_k == 1:
        return logits.argmax(dim=-1)
    k = top_k if 0 < top_k < V else V
    vals, ids = logits.topk(k, dim=-1, largest=True, sorted=True)  # descending
    probs = vals.softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    if top_p > 0:
        # keep a candidate iff the mass strictly above it is < top_p (the first one always)
        probs = probs.masked_fill((cum - probs) >= top_p, 0.0)
        cum = probs.cumsum(dim=-1)
    u = torch.rand(B, n, 1, device=logits.device, generator=generator) * cum[..., -1:]
    pick = torch.searchsorted(cum, u).clamp_max_(k - 1)
    return ids.gather(-1, pick).squeeze(-1)


@torch.no_grad()
def sample_fast(model: NextScaleTransformer, tokenizer: Any, labels: torch.Tensor, *, cfg: float = 1.5,
                top_k: int = 0, top_p: float = 0.0, seed: Optional[int] = None, state: Any = None,
                decode: bool = False, fused_mlp: bool = False) -> list[torch.Tensor]:
    """Class-conditional generation; returns per-scale indices ``(B, n_k)`` (and decodes if asked).
    ``fused_mlp``: CPU only, see :func:`mlp`."""
    fused_mlp = fused_mlp and model.pos_1LC.device.type == "cpu" and fused_mlp_available()
    sched = model.schedule
    device = model.pos_1LC.device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    K = len(sched)
    labels = model.check_labels(torch.as_tensor(labels, device=device))
    B = labels.shape[0]
    guided = cfg != 0 and model.num_classes > 0
    run_labels = torch.cat((labels, torch.full_like(labels, model.num_classes))) if guided else labels
    cond, cond_blocks = model.condition(run_labels)
    mods = modulations(model, cond_blocks)
    caches = model.new_caches(run_labels.shape[0], device=device)
    lvl_pos = model.level_pos()
    st = state if state is not None else tokenizer.start(B, device)
    h = model.embed_start(cond, lvl_pos)
    indices = []
    for k in range(K):
        for b, c, mod in zip(model.blocks, caches, mods):
            h = block_step(b, h, mod, c, fused_mlp)
        t = guidance_strength(cfg, k, K) if guided else 0.0
        if guided and t != 0:
            logits = model.logits(h, cond)
            logits = torch.lerp(logits[B:], logits[:B], 1 + t)
        elif guided:
            logits = model.logits(h[:B], cond[:B])
        else:
            logits = model.logits(h, cond)
        idx = draw(logits, top_k, top_p, gen)
        indices.append(idx)
        nxt = st.add_scale(k, idx)
        if k < K - 1:
            h = model.embed_scale(nxt, k + 1, lvl_pos)
            if guided:
                h = h.repeat(2, 1, 1)
    if decode and tokenizer is not None:
        return indices, tokenizer.finish(st)
    return indices
