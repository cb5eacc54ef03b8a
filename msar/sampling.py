"""Scale-by-scale generation with a KV cache, classifier-free guidance and top-k/top-p.

:func:`sample` drives a :class:`~msar.models.transformer.NextScaleTransformer` and a
:class:`~msar.tokenizer.PyramidTokenizer` together::

    for k in 0..K-1:
        logits = transformer.step(input_k)          # (2B, n_k, V) with guidance
        logits = (1 + t_k) * cond - t_k * uncond     # t_k = cfg * k / (K - 1) (VAR's ramp)
        idx_k  = top-k / top-p sample (or greedy)
        idx_k  = where(known_mask_k, known_k, idx_k) # editing: teacher-force known tokens
        input_{k+1} = state.add_scale(k, idx_k)

Known tokens at every scale are what make zero-shot inpainting, outpainting,
frame prediction and shape completion work in every modality.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .models.transformer import NextScaleTransformer


@dataclass
class SampleOutput:
    """``indices``: per scale ``(B, n_k)``; ``data``: the decoded batch (or None); ``labels``: ``(B,)``."""

    indices: list[torch.Tensor]
    data: Any
    labels: torch.Tensor


def guidance_strength(cfg: float, k: int, num_scales: int, schedule: str = "linear") -> float:
    """VAR's guidance ramp ``cfg * k / (K - 1)`` (``"linear"``) or a constant ``cfg``."""
    if schedule == "linear":
        return cfg * k / (num_scales - 1) if num_scales > 1 else cfg
    if schedule == "constant":
        return cfg
    raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {schedule!r}")


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to ``-inf`` every logit outside the top-k and outside the smallest set whose
    probability mass reaches ``top_p`` (nucleus). ``logits``: ``(..., V)``; returns a new tensor."""
    V = logits.shape[-1]
    out = logits.clone()
    if top_k > 0 and top_k < V:
        kth = logits.topk(top_k, dim=-1, largest=True, sorted=False).values.amin(dim=-1, keepdim=True)
        out.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = out.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        out.masked_fill_(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return out


def sample_tokens(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token per position: ``(B, n, V)`` logits -> ``(B, n)`` long.

    ``top_k == 1`` is greedy (argmax, no randomness drawn). With ``top_k > 0`` the
    nucleus is computed inside the top-k only (equivalent, and far cheaper than
    sorting the whole vocabulary).
    """
    B, n, V = logits.shape
    if top_k == 1:
        return logits.argmax(dim=-1)
    if temperature != 1.0:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        logits = logits / temperature
    if 0 < top_k < V:
        # topk returns the candidates sorted (descending): the nucleus is a prefix of them, so
        # no second sort / scatter is needed, and the cumulative sum doubles as the CDF from
        # which one uniform per position draws the token (multinomial would draw top_k exponentials)
        vals, ids = logits.topk(top_k, dim=-1, largest=True, sorted=True)
        probs = vals.softmax(-1)
        cum = probs.cumsum(-1)
        if top_p > 0:
            probs = probs.masked_fill((cum - probs) >= top_p, 0.0)  # keep while the mass above < top_p
            cum = probs.cumsum(-1)
        u = torch.rand(B, n, 1, device=logits.device, generator=generator) * cum[..., -1:]
        pick = torch.searchsorted(cum, u).clamp_max_(top_k - 1)
        return ids.gather(-1, pick).squeeze(-1)
    if top_p > 0:
        logits = filter_top_k_top_p(logits, 0, top_p)
    return torch.multinomial(logits.softmax(-1).view(-1, V), 1, generator=generator).view(B, n)


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Soft Gumbel-softmax over the last dim with an explicit generator (reproducible)."""
    u = torch.empty_like(logits).exponential_(generator=generator)
    return ((logits - u.log()) / tau).softmax(-1)


def _as_generator(seed: Optional[int], generator: Optional[torch.Generator], device) -> Optional[torch.Generator]:
    if generator is not None:
        return generator
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _check_knobs(batch_size: Any, cfg: Any, top_k: Any, top_p: Any, temperature: Any) -> None:
    """Clear errors for the sampling knobs (a negative top_k or a top_p above 1 would
    otherwise pass silently, a NaN cfg fail deep inside multinomial)."""
    def index_or_none(v: Any) -> Optional[int]:
        try:
            return None if isinstance(v, bool) else operator.index(v)
        except TypeError:
            return None

    if batch_size is not None and (index_or_none(batch_size) is None or batch_size < 0):
        raise ValueError(f"batch_size must be an int >= 0, got {batch_size!r}")
    if index_or_none(top_k) is None or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off, 1 = greedy), got {top_k!r}")
    for name, v, ok in (("top_p", top_p, lambda x: 0.0 <= x <= 1.0), ("cfg", cfg, math.isfinite),
                        ("temperature", temperature, lambda x: 0.0 < x < math.inf)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not ok(float(v)):
            want = {"top_p": "in [0, 1] (0 = off)", "cfg": "a finite number", "temperature": "> 0 and finite"}[name]
            raise ValueError(f"{name} must be {want}, got {v!r}")


def _apply_hook(hook: Callable, k: int, logits: torch.Tensor, indices: list[torch.Tensor]) -> torch.Tensor:
    out = hook(k, logits, list(indices))
    if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
        raise ValueError(f"logits_hook must return a tensor of the logits' shape {tuple(logits.shape)} at scale {k}, "
                         f"got {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    dead = ~torch.isfinite(out).any(-1) | torch.isnan(out).any(-1)
    if dead.any():
        b, i = (int(v) for v in dead.nonzero()[0])
        raise ValueError(f"logits_hook left no finite logit (or a NaN) at scale {k}, sample {b}, position {i}: "
                         "every position needs at least one allowed token")
    return out


@torch.no_grad()
def sample(
    model: NextScaleTransformer,
    tokenizer: Any,
    labels: Optional[torch.Tensor | Sequence[int] | int] = None,
    batch_size: Optional[int] = None,
    *,
    cfg: float = 1.5,
    cfg_schedule: str = "linear",
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    more_smooth: bool = False,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    known: Optional[Sequence[torch.Tensor]] = None,
    known_mask: Optional[Sequence[torch.Tensor]] = None,
    decode: bool = True,
    state: Any = None,
    logits_hook: Optional[Callable[[int, torch.Tensor, list[torch.Tensor]], torch.Tensor]] = None,
) -> SampleOutput:
    """Generate a batch scale by scale.

    Args:
        model: the transformer (put in eval mode by the caller).
        tokenizer: a :class:`~msar.tokenizer.PyramidTokenizer` with the model's schedule.
        labels: ``(B,)`` class labels, one int for all, or None to draw uniformly
            (unconditional models always use the null class).
        batch_size: B when ``labels`` is None or an int.
        cfg: guidance strength; 0 disables guidance (and skips the unconditional pass).
        cfg_schedule: ``"linear"`` (VAR's ramp over scales) or ``"constant"``.
        top_k, top_p, temperature: token filtering; ``top_k=1`` is greedy.
        more_smooth: VAR's Gumbel smoothing of the codewords (visual quality only).
        seed / generator: reproducibility; the same seed gives the same sample.
        known, known_mask: per scale ``(B, n_k)`` indices and bool masks; masked
            positions are teacher-forced to ``known`` at every scale (editing).
        decode: decode the final state to data with ``tokenizer.finish``.
        state: a tokenizer decode state to use instead of ``tokenizer.start(B)``
            (for adapters whose state needs per-sample context).
        logits_hook: ``hook(k, logits (B, n_k, V), indices_so_far) -> logits`` called at
            every scale after guidance and before filtering / sampling; return new logits
            (e.g. ``-inf`` on tokens that are invalid at scale k: padding, a token kind
            that belongs to another scale, or structure ruled out by earlier scales).
            Known tokens (editing) are forced afterwards, whatever the hook did.
    """
    _check_knobs(batch_size, cfg, top_k, top_p, temperature)
    sched = model.schedule
    if tokenizer is not None and hasattr(tokenizer, "schedule") and tokenizer.schedule.token_counts != sched.token_counts:
        raise ValueError(f"tokenizer schedule {tokenizer.schedule} does not match the model's {sched}")
    device = model.pos_1LC.device
    gen = _as_generator(seed, generator, device)
    K = len(sched)

    # ---- labels
    if model.num_classes == 0:
        if labels is None and batch_size is None:
            raise ValueError("an unconditional model needs batch_size")
        B = batch_size if labels is None or isinstance(labels, int) else len(labels)
        labels = torch.full((B,), model.num_classes, dtype=torch.long, device=device)
    elif labels is None:
        if batch_size is None:
            raise ValueError("pass labels or batch_size")
        labels = torch.randint(0, model.num_classes, (batch_size,), generator=gen, device=device)
    elif isinstance(labels, int):
        if batch_size is None:
            raise ValueError("an int label needs batch_size")
        labels = torch.full((batch_size,), labels, dtype=torch.long, device=device)
    else:
        labels = torch.as_tensor(labels, device=device)
    labels = model.check_labels(labels)
    B = labels.shape[0]

    if known is not None or known_mask is not None:
        if known is None or known_mask is None:
            raise ValueError("editing needs both known (indices) and known_mask (bool masks)")
        sched.check_indices(known, model.V, batch_size=B, name="known")
        sched.check_indices([m.long() for m in known_mask], None, batch_size=B, name="known_mask")
        known = [t.to(device) for t in known]
        known_mask = [m.to(device).bool() for m in known_mask]

    guided = cfg != 0 and model.num_classes > 0
    null = torch.full_like(labels, model.num_classes)
    run_labels = torch.cat((labels, null)) if guided else labels
    cond, cond_blocks = model.condition(run_labels)
    mods = model.modulations(cond_blocks)
    caches = model.new_caches(run_labels.shape[0], device=device)
    lvl_pos = model.level_pos()
    st = state if state is not None else tokenizer.start(B, device)

    h = model.embed_start(cond, lvl_pos)
    indices: list[torch.Tensor] = []
    for k in range(K):
        t = guidance_strength(cfg, k, K, cfg_schedule) if guided else 0.0
        if guided and t == 0:  # (VAR's ramp starts at 0) the null half only fills its KV cache
            logits = model.step(h, cond, cond_blocks, caches, mods, head_rows=B)
        else:
            logits = model.step(h, cond, cond_blocks, caches, mods)
            if guided:  # VAR's formula verbatim (a lerp would reorder the float ops and can flip greedy ties)
                logits = (1 + t) * logits[:B] - t * logits[B:]
        if logits_hook is not None:
            logits = _apply_hook(logits_hook, k, logits, indices)
        idx = sample_tokens(logits, top_k, top_p, temperature, gen)
        probs = None
        if known is not None:
            idx = torch.where(known_mask[k], known[k], idx)
        if more_smooth:
            ratio = k / (K - 1) if K > 1 else 1.0
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)  # VAR's schedule (after MaskGIT)
            probs = gumbel_softmax(logits.mul(1 + ratio), tau, gen)
            if known is not None:
                hard = F.one_hot(known[k], model.V).to(probs.dtype)
                probs = torch.where(known_mask[k].unsqueeze(-1), hard, probs)
        indices.append(idx)
        nxt = st.add_scale(k, idx, probs)
        if k < K - 1:
            h = model.embed_scale(nxt, k + 1, lvl_pos)
            if guided:
                h = h.repeat(2, 1, 1)
    data = tokenizer.finish(st) if (decode and tokenizer is not None) else None
    return SampleOutput(indices, data, labels)
