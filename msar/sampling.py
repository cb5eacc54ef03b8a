"""Scale-by-scale generation with a KV cache, classifier-free guidance and top-k/top-p.

:func:`sample` drives a :class:`~msar.models.transformer.NextScaleTransformer` and a
:class:`~msar.tokenizer.PyramidTokenizer` together; every step of the loop is a small
function of this module with its own test against the exact distribution::

    state = tokenizer.start(B, device, context)
    for k in 0..K-1:
        logits = transformer.step(input_k)                      # (2B, n_k, V) with guidance
        logits = apply_guidance(cond, uncond, t_k)              # (1 + t_k) cond - t_k uncond
        logits = logits_hook(k, logits, state)                  # optional: rule tokens out
        logits = apply_temperature(logits, temperature)
        idx_k  = sample_tokens(logits, top_k, top_p)            # greedy when top_k == 1
        idx_k  = where(known_mask_k, known_k, idx_k)            # editing: teacher-force known tokens
        input_{k+1} = state.add_scale(k, idx_k)

``t_k = cfg * p_k`` is VAR's linear ramp (``cfg_schedule="linear"``; ``p_k`` is the schedule's
:meth:`~msar.ScaleSchedule.progress`, ``k / (K - 1)`` unless the schedule restarts its ramp, as
per-frame video pyramids do) or ``cfg`` (``"constant"``). Known tokens at every scale are what make zero-shot inpainting,
outpainting, frame prediction and shape completion work in every modality.
"""
from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .bitwise import bits_to_index
from .conditioning import Condition
from .models.transformer import NextScaleTransformer
from .tokenizer import check_candidate_features

LogitsHook = Callable[[int, torch.Tensor, Any], torch.Tensor]

if TYPE_CHECKING:
    from .acceleration import Acceleration


@dataclass
class SampleOutput:
    """``indices``: per scale ``(B, n_k)``; ``data``: the decoded batch (or None); ``labels``: ``(B,)``
    (class models; None otherwise); ``condition``: the :class:`~msar.Condition` sampled from (None
    for a class model given labels, and for unconditional samples of a conditioned model);
    ``state``: the tokenizer's decode state after the last scale (what ``tokenizer.start`` returned),
    for what a modality counts while decoding, e.g. splits its decoder refused."""

    indices: list[torch.Tensor]
    data: Any
    labels: torch.Tensor | None
    condition: Condition | None = None
    state: Any = None


# ---------------------------------------------------------------------------- the steps
def guidance_strength(cfg: float, progress: float, schedule: str = "linear") -> float:
    """Guidance weight ``t_k`` of a scale at ``progress`` (:meth:`msar.ScaleSchedule.progress`, in
    [0, 1]): VAR's ramp ``cfg * progress`` (``"linear"``; ``cfg * k / (K - 1)`` on a plain schedule)
    or ``cfg`` (``"constant"``)."""
    if schedule == "linear":
        return cfg * progress
    if schedule == "constant":
        return cfg
    raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {schedule!r}")


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, t: float) -> torch.Tensor:
    """Classifier-free guidance ``(1 + t) * cond - t * uncond`` on ``(B, n, V)`` logits.

    VAR's formula verbatim: a ``lerp`` is the same in exact arithmetic but orders the float
    operations differently and can flip greedy ties, breaking token parity with VAR. The
    subtraction is in place on the fresh product (the same values, one ``(B, n, V)`` temporary
    fewer: at VAR's last scale that is a 34 MB allocation, page-faulted afresh on CPU)."""
    return ((1 + t) * cond).sub_(t * uncond)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``: below 1 sharpens the distribution, above 1 flattens it."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def top_k_top_p_candidates(logits: torch.Tensor, top_k: int = 0,
                           top_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens that survive top-k and nucleus filtering, most likely first.

    ``logits`` ``(..., V)`` -> ``(values, ids)`` each ``(..., m)`` with ``m = top_k`` (or V),
    sorted by decreasing logit; filtered-out candidates have value ``-inf``.

    * top-k (``0 < top_k < V``) keeps the k largest logits (exact ties at the k-th value are
      broken by ``topk``).
    * top-p (``0 < top_p < 1``), computed on the softmax of the top-k survivors, keeps the
      smallest prefix whose mass reaches ``top_p``: a candidate is kept iff the mass of the
      candidates strictly more likely than it is below ``top_p`` -- so the token that crosses
      ``top_p`` is kept (as in VAR), and the most likely token always is.
    """
    V = logits.shape[-1]
    if 0 < top_k < V:
        # an unsorted top-k and then a sort of its k survivors: the same (values, ids) as a sorted
        # top-k (exact ties in any order), about twice as fast on CPU for VAR's k=900 of V=4096
        vals, ids = logits.topk(top_k, dim=-1, largest=True, sorted=False)
        vals, order = vals.sort(dim=-1, descending=True)
        ids = ids.gather(-1, order)
    else:
        vals, ids = logits.sort(dim=-1, descending=True)
    if 0 < top_p < 1:
        probs = vals.softmax(-1)
        mass_above = probs.cumsum(-1) - probs
        vals = vals.masked_fill(mass_above >= top_p, float("-inf"))
    return vals, ids


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """``logits`` ``(..., V)`` with ``-inf`` on every token that top-k / top-p filtering removes
    (see :func:`top_k_top_p_candidates`, the one implementation of both); a new tensor."""
    vals, ids = top_k_top_p_candidates(logits, top_k, top_p)
    return torch.full_like(logits, float("-inf")).scatter_(-1, ids, vals)


def draw(values: torch.Tensor, ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per position from ``softmax(values)`` over the candidates ``ids`` ``(B, n, m)``.

    Inverse CDF: one uniform per position, located in the cumulative sum of the candidates'
    probabilities (``multinomial`` would draw one exponential per candidate). Candidates with
    value ``-inf`` have probability 0 and are never drawn. Returns ``(B, n)`` long."""
    cum = values.softmax(-1).cumsum(-1)
    u = torch.rand(*values.shape[:-1], 1, device=values.device, generator=generator) * cum[..., -1:]
    pick = torch.searchsorted(cum, u).clamp_max_(values.shape[-1] - 1)
    return ids.gather(-1, pick).squeeze(-1)


def sample_tokens(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per position: ``(B, n, V)`` logits -> ``(B, n)`` long.

    The distribution is ``softmax(filter_top_k_top_p(logits / temperature, top_k, top_p))``.
    ``top_k == 1`` is greedy (argmax; no randomness drawn, temperature irrelevant)."""
    if top_k == 1:
        return logits.argmax(dim=-1)
    vals, ids = top_k_top_p_candidates(apply_temperature(logits, temperature), top_k, top_p)
    return draw(vals, ids, generator)


def bit_pairs(logits: torch.Tensor) -> torch.Tensor:
    """Bit logits ``(..., d)`` -> two-way logits ``(..., d, 2)`` ``(0, l)``: softmax gives
    ``P(bit = 1) = sigmoid(l)``, so every token-level step applies per bit unchanged."""
    return torch.stack((torch.zeros_like(logits), logits), dim=-1)


def sample_bits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per position from bit logits (a bitwise head): ``(B, n, d)`` -> ``(B, n)`` long.

    Each bit is an independent two-way choice (Infinity): ``P(bit = 1) = sigmoid(l / temperature)``
    filtered per bit by top-k / top-p (:func:`top_k_top_p_candidates` on :func:`bit_pairs`):
    ``top_k == 1`` takes the likelier bit (greedy; ties give 0), and top-p keeps the less likely
    bit only when the likelier one has mass below ``top_p``.  The token is the bits as an
    integer (:func:`msar.bitwise.bits_to_index`).  Guidance and logits hooks act on the bit
    logits before this step, exactly as on token logits."""
    if top_k == 1:
        return bits_to_index(logits > 0)
    vals, ids = top_k_top_p_candidates(apply_temperature(bit_pairs(logits), temperature), top_k, top_p)
    return bits_to_index(draw(vals, ids, generator))


def gumbel_smoothing(logits: torch.Tensor, ratio: float,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """VAR's ``more_smooth``: soft codeword weights ``(B, n, V)`` from a Gumbel-softmax of
    ``logits * (1 + r)`` at temperature ``max(0.27 (1 - 0.95 r), 0.005)``, ``r`` the scale's
    :meth:`~msar.ScaleSchedule.progress` (``k / (K - 1)`` in VAR; after MaskGIT); visual
    smoothness only."""
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    g = torch.empty_like(logits).exponential_(generator=generator).log_()
    return ((logits.mul(1 + ratio) - g) / tau).softmax(-1)


def _apply_hook(hook: LogitsHook, k: int, logits: torch.Tensor, state: Any) -> torch.Tensor:
    out = hook(k, logits, state)
    if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
        raise ValueError(f"logits_hook must return a tensor of the logits' shape {tuple(logits.shape)} at scale {k}, "
                         f"got {tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
    dead = ~torch.isfinite(out).any(-1) | torch.isnan(out).any(-1)
    if dead.any():
        b, i = (int(v) for v in dead.nonzero()[0])
        raise ValueError(f"logits_hook left no finite logit (or a NaN) at scale {k}, sample {b}, position {i}: "
                         "every position needs at least one allowed token")
    return out


# ---------------------------------------------------------------------------- input validation
def _as_generator(seed: int | None, generator: torch.Generator | None, device) -> torch.Generator | None:
    if generator is not None:
        return generator
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def _check_knobs(batch_size: Any, cfg: Any, top_k: Any, top_p: Any, temperature: Any) -> None:
    """Clear errors for the sampling knobs (a negative top_k or a top_p above 1 would
    otherwise pass silently, a NaN cfg fail deep inside the draw)."""
    def index_or_none(v: Any) -> int | None:
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


def _labels(model: NextScaleTransformer, labels: Any, batch_size: int | None,
            gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """The ``(B,)`` class labels of a generation (the null class for unconditional models)."""
    if model.num_classes == 0:
        if labels is not None and not isinstance(labels, int):
            raise ValueError("an unconditional model (num_classes=0) takes no labels; pass batch_size")
        if batch_size is None:
            raise ValueError("an unconditional model needs batch_size")
        return torch.full((batch_size,), model.num_classes, dtype=torch.long, device=device)
    if labels is None:
        if batch_size is None:
            raise ValueError("pass labels or batch_size")
        labels = torch.randint(0, model.num_classes, (batch_size,), generator=gen, device=device)
    elif isinstance(labels, int):
        if batch_size is None:
            raise ValueError("an int label needs batch_size")
        labels = torch.full((batch_size,), labels, dtype=torch.long, device=device)
    else:
        labels = torch.as_tensor(labels, device=device)
    # the null class is not a label to ask for: guidance and dropout use it internally
    return model.check_labels(labels, allow_null=False)


def _condition(model: NextScaleTransformer, condition: Condition, labels: Any, batch_size: int | None,
               device: torch.device) -> Condition | None:
    """The validated Condition of a generation of a model with ``cond_kind`` vector / sequence
    (None: every row unconditional, the null condition; needs ``batch_size``)."""
    if labels is not None:
        raise ValueError(f"this model is conditioned on {model.cond_kind} conditions: pass condition=, not labels")
    if condition is None:
        if batch_size is None:
            raise ValueError(f"pass condition=msar.Condition.{model.cond_kind}(...) (or batch_size alone for "
                             f"unconditional samples from the null condition)")
        return None
    condition = model.check_condition(condition).to(device)
    if batch_size is not None and batch_size != condition.batch_size:
        raise ValueError(f"batch_size {batch_size} differs from the condition's batch size {condition.batch_size}")
    return condition


def _known(sched, known, known_mask, V: int, B: int, device) -> tuple[list | None, list | None]:
    if known is None and known_mask is None:
        return None, None
    if known is None or known_mask is None:
        raise ValueError("editing needs both known (indices) and known_mask (bool masks)")
    sched.check_indices(known, V, batch_size=B, name="known")
    sched.check_indices([m.long() for m in known_mask], None, batch_size=B, name="known_mask")
    return [t.to(device) for t in known], [m.to(device).bool() for m in known_mask]


# ---------------------------------------------------------------------------- the loop
@torch.no_grad()
def sample(
    model: NextScaleTransformer,
    tokenizer: Any,
    labels: torch.Tensor | Sequence[int] | int | None = None,
    batch_size: int | None = None,
    *,
    cfg: float = 1.5,
    cfg_schedule: str = "linear",
    top_k: int = 0,
    top_p: float = 0.0,
    temperature: float = 1.0,
    more_smooth: bool = False,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    known: Sequence[torch.Tensor] | None = None,
    known_mask: Sequence[torch.Tensor] | None = None,
    decode: bool = True,
    context: Any = None,
    logits_hook: LogitsHook | None = None,
    extra_pos: torch.Tensor | None = None,
    accel: "Acceleration" | None = None,
    condition: Condition | None = None,
) -> SampleOutput:
    """Generate a batch scale by scale (the loop of the module docstring).

    Args:
        model: the transformer (put in eval mode by the caller).
        tokenizer: a :class:`~msar.tokenizer.PyramidTokenizer` with the model's schedule.
        labels: ``(B,)`` class labels in ``[0, num_classes)``, one int for all, or None to
            draw uniformly (unconditional models take ``batch_size`` only).
        batch_size: B when ``labels`` is None or an int.
        cfg: guidance strength; 0 disables guidance (and skips the unconditional pass).
        cfg_schedule: ``"linear"`` (VAR's ramp, ``cfg * tokenizer.schedule.progress(k)``) or ``"constant"``.
        top_k, top_p, temperature: token filtering; ``top_k=1`` is greedy.
        more_smooth: VAR's Gumbel smoothing of the codewords (visual quality only).
        seed / generator: reproducibility; the same seed gives the same sample.
        known, known_mask: per scale ``(B, n_k)`` indices and bool masks; masked
            positions are teacher-forced to ``known`` at every scale (editing).
        decode: decode the final state to data with ``tokenizer.finish``.
        context: per-sample information for ``tokenizer.start(B, device, context)``
            (adapters whose decoding needs it; None otherwise).
        logits_hook: ``hook(k, logits (B, n_k, V), state) -> logits`` called at every scale
            after guidance and before temperature / filtering; ``state`` is the tokenizer's
            decode state (``state.indices``: the tokens chosen so far). Return new logits,
            e.g. ``-inf`` on tokens that are invalid at scale k. Known tokens (editing) are
            forced afterwards, whatever the hook did.
        extra_pos: optional ``(B or 1, L, C)`` adapter positions, as in the model's forward
            (both halves of guidance get the same ones).
        accel: opt-in approximate modes (:class:`msar.acceleration.Acceleration`: guidance off
            at the finest scales, a draft/refine split, token pruning); None samples exactly.
        condition: a :class:`~msar.Condition` of the model's ``cond_kind`` (instead of
            ``labels``; ``Condition.classes`` is the same as its labels). Guidance pairs it with
            the learned null condition; a conditioned model given ``batch_size`` alone samples
            unconditionally (the null condition, no guidance). Cross-attention keys / values
            are computed once here and reused at every scale.
    """
    _check_knobs(batch_size, cfg, top_k, top_p, temperature)
    bitwise = model.cfg.head == "bitwise"  # logits are (B, n_k, bits): tokens are drawn bit by bit
    if bitwise and more_smooth:
        raise ValueError("more_smooth needs token probabilities: a transformer with a bitwise head has none")
    sched = model.schedule
    if tokenizer is not None and tokenizer.schedule.token_counts != sched.token_counts:
        raise ValueError(f"tokenizer schedule {tokenizer.schedule} does not match the model's {sched}")
    # the modality's schedule says where each scale sits in its pyramid (progress: the guidance
    # ramp); a model built from a plain list of scales has the token layout but not that
    ramp = tokenizer.schedule if tokenizer is not None else sched
    scores_candidates = model.cfg.candidate_dim > 0  # logits also from the tokenizer's per-token features
    if scores_candidates:
        check_candidate_features(tokenizer, model.cfg.candidate_dim)
        if accel is not None:
            raise ValueError("accel: the approximate modes do not pass candidate features; sample a "
                             "candidate-scoring model (candidate_dim > 0) without accel")
    device = next(model.parameters()).device
    gen = _as_generator(seed, generator, device)
    K = len(sched)
    if isinstance(labels, Condition):  # sample(model, tok, Condition...) reads as condition=
        if condition is not None:
            raise ValueError("pass labels or condition, not both")
        labels, condition = None, labels
    if condition is not None and not isinstance(condition, Condition):
        raise ValueError(f"condition must be a msar.Condition, got {type(condition).__name__} (plain class "
                         f"labels go in labels=)")
    if model.cond_kind == "classes":  # labels -> Condition.classes (the null class for unconditional models)
        if condition is not None:
            if labels is not None:
                raise ValueError("pass labels or condition, not both")
            labels = model.check_condition(condition).labels  # another kind: a clear error
        condition = Condition.classes(_labels(model, labels, batch_size, gen, device))
        guided = cfg != 0 and model.num_classes > 0
    else:
        condition = _condition(model, condition, labels, batch_size, device)
        guided = cfg != 0 and condition is not None
    # the generation's conditions: guidance appends the same rows as the null condition
    B = batch_size if condition is None else condition.batch_size
    run_condition, null_rows = condition, None
    if condition is None:  # a conditioned model given batch_size alone: every row the null condition
        shape = (B, model.cond_dim) if model.cond_kind == "vector" else (B, 1, model.cond_dim)
        run_condition = Condition(model.cond_kind, features=torch.zeros(shape, device=device))
        null_rows = torch.ones(B, dtype=torch.bool, device=device)
    elif guided:
        run_condition = Condition.cat([condition, condition])
        null_rows = torch.arange(2 * B, device=device) >= B
    cond, cond_blocks, cross = model.encode_condition(run_condition, null_rows)
    known, known_mask = _known(sched, known, known_mask, model.cfg.vocab_size, B, device)
    mods = model.modulations(cond_blocks)
    caches = model.new_caches(cond.shape[0], device=device)
    if extra_pos is not None and extra_pos.shape[0] not in (1, B):
        raise ValueError(f"extra_pos has batch size {extra_pos.shape[0]}, expected 1 or {B}")
    level_pos = model.level_pos(None if extra_pos is None else extra_pos.to(device))  # (1 or B, L, C)
    state = tokenizer.start(B, device, context)

    h = model.embed_start(cond, level_pos.repeat(2, 1, 1) if guided and level_pos.shape[0] > 1 else level_pos)
    runner = None if accel is None else accel.runner(model, guided, cond, cond_blocks, mods, caches, level_pos,
                                                     extra_pos, cross, (run_condition, null_rows))
    nxt = None  # the tokenizer's input of scale k (None at k = 0)
    cand = None  # its candidate features (B, n_k, V, F), models that score candidates
    for k in range(K):
        t = guidance_strength(cfg, ramp.progress(k), cfg_schedule) if guided else 0.0
        if runner is not None:  # msar.acceleration's approximate modes
            logits = runner.logits(k, h, nxt, t)
        elif guided and t == 0:  # (VAR's ramp starts at 0) the null half only fills its KV cache
            logits = model.step(h, cond, cond_blocks, caches, mods, head_rows=B, cross=cross, candidates=cand)
        else:
            logits = model.step(h, cond, cond_blocks, caches, mods, cross=cross, candidates=cand)
            if guided:
                logits = apply_guidance(logits[:B], logits[B:], t)
        if logits_hook is not None:
            logits = _apply_hook(logits_hook, k, logits, state)
        logits = apply_temperature(logits, temperature)
        idx = (sample_bits if bitwise else sample_tokens)(logits, top_k, top_p, 1.0, gen)
        if known is not None:
            idx = torch.where(known_mask[k], known[k], idx)
        probs = None
        if more_smooth:  # VAR smooths the filtered logits
            probs = gumbel_smoothing(filter_top_k_top_p(logits, top_k, top_p), ramp.progress(k), gen)
            if known is not None:
                hard = F.one_hot(known[k], model.cfg.vocab_size).to(probs.dtype)
                probs = torch.where(known_mask[k].unsqueeze(-1), hard, probs)
        nxt = state.add_scale(k, idx, probs)
        if k < K - 1:
            h = model.embed_scale(nxt, k + 1, level_pos)
            if scores_candidates:
                cand = tokenizer.candidate_features(nxt)
            if guided:
                h = h.repeat(2, 1, 1)
    data = tokenizer.finish(state) if (decode and tokenizer is not None) else None
    if model.cond_kind == "classes":
        return SampleOutput(list(state.indices), data, condition.labels, state=state)
    return SampleOutput(list(state.indices), data, None, condition, state)
