"""Opt-in, approximate ways to sample faster: ``msar.sample(..., accel=Acceleration(...))``.

Every mode trades some fidelity to the model's distribution for speed, is off by default, and
works for any modality (it only touches the transformer's scale loop). With every field at
its default, ``Acceleration()`` runs the exact computation of :func:`msar.sample` (the same
tokens for the same seed). The modes, by field:

``guidance_off_last=n``
    Classifier-free guidance is switched off for the last n scales: from scale ``K - n`` on the
    unconditional half is dropped from the batch, its KV caches and its AdaLN modulations, so
    the finest scales run half the rows and take the conditional logits alone. Approximated:
    those scales' distribution is the conditional model's, not the guided one.
``refiner=small_model, refine_last=n``
    A draft/refine split (after CoDe): the model passed to ``sample`` draws the coarse scales
    ``0 .. K-n-1``, ``refiner`` (a smaller transformer over the same schedule, vocabulary and
    tokenizer) draws the last n. The refiner runs on the coarse scales too, without its head,
    so its KV caches hold the draft's coarse tokens when it takes over. Approximated: the fine
    scales come from the refiner's distribution.
``prune_last=n, prune_keep=f``
    Token pruning at the last n scales (after FastVAR's cached token pruning): at such a scale
    only the ``ceil(f n_k)`` tokens whose input latent lies farthest from the scale's mean input
    (its high-frequency tokens, per sample) go through the transformer; every other position
    takes the logits of the previous scale at its nearest coarser position (nearest-neighbour
    on the schedule's grids, proportional index for token-count scales). Approximated: the
    pruned positions' logits, and the keys/values of pruned tokens, which later scales then do
    not attend to.

:func:`quantize_int8` is the fourth mode: a copy of a transformer whose linear layers are int8
dynamically quantised (CPU), passed to ``sample`` in place of the float model.

The modes compose::

    from msar import Acceleration, quantize_int8, sample
    fast = Acceleration(refiner=small, refine_last=2, guidance_off_last=1)
    out = sample(quantize_int8(model), tokenizer, labels, cfg=3.0, top_k=20, accel=fast)

What each costs in quality, measured, is in ``benchmarks/results/acceleration/README.md``
(``python -m benchmarks.acceleration``).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .models.transformer import KVCache, NextScaleTransformer
from .sampling import apply_guidance


@dataclass(frozen=True)
class Acceleration:
    """The approximate modes of :func:`msar.sample` (see the module docstring); all off by default.

    Args:
        guidance_off_last: guidance off (and the unconditional rows not computed) at the last
            this many scales.
        refiner: a smaller transformer with the same schedule, vocabulary, latent size and
            classes, for the last ``refine_last`` scales.
        refine_last: number of final scales the refiner draws (needs ``refiner``).
        prune_last: number of final scales with token pruning (scale 0 is never pruned).
        prune_keep: fraction of a pruned scale's tokens that go through the transformer, in (0, 1].
    """

    guidance_off_last: int = 0
    refiner: NextScaleTransformer | None = None
    refine_last: int = 0
    prune_last: int = 0
    prune_keep: float = 0.5

    def __post_init__(self):
        for name in ("guidance_off_last", "refine_last", "prune_last"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"Acceleration.{name} must be an int >= 0, got {v!r}")
        if isinstance(self.prune_keep, bool) or not 0 < float(self.prune_keep) <= 1:
            raise ValueError(f"Acceleration.prune_keep must be in (0, 1], got {self.prune_keep!r}")
        if (self.refiner is None) != (self.refine_last == 0):
            raise ValueError("a draft/refine split needs both refiner (a model) and refine_last >= 1")

    def runner(self, model: NextScaleTransformer, guided: bool, cond: torch.Tensor, cond_blocks: torch.Tensor,
               mods: list, caches: list[KVCache], level_pos: torch.Tensor, extra_pos: torch.Tensor | None,
               cross: list | None, condition: tuple) -> "AcceleratedRunner":
        """The per-scale logits of one generation (called by :func:`msar.sample`, which has
        computed the draft model's condition, modulations, caches and positions).  ``condition``:
        the run's ``(Condition, null_rows)`` as given to ``model.encode_condition``; ``cross``:
        the draft's cross-attention keys / values."""
        return AcceleratedRunner(self, model, guided, cond, cond_blocks, mods, caches, level_pos, extra_pos,
                                 cross, condition)


def _check_refiner(model: NextScaleTransformer, refiner: NextScaleTransformer) -> None:
    if not isinstance(refiner, NextScaleTransformer):
        raise TypeError(f"Acceleration.refiner must be a NextScaleTransformer, got {type(refiner).__name__}")
    for name in ("vocab_size", "latent_dim", "num_classes", "cond_kind", "cond_dim"):
        if getattr(refiner, name) != getattr(model, name):
            raise ValueError(f"the refiner's {name} ({getattr(refiner, name)}) differs from the model's "
                             f"({getattr(model, name)}): both must share one tokenizer and its classes")
    if refiner.schedule.token_counts != model.schedule.token_counts:
        raise ValueError(f"the refiner's schedule {refiner.schedule} differs from the model's {model.schedule}")


def parent_positions(schedule, k: int, device=None) -> torch.Tensor:
    """``(n_k,)`` long: for every position of scale ``k >= 1``, its nearest position in scale k - 1.

    Grids: per dimension ``floor(c * s_{k-1} / s_k)`` (nearest-neighbour upsampling); token-count
    scales (or grids of different rank): ``floor(i * n_{k-1} / n_k)`` on the flat index."""
    a, b = schedule.shape(k - 1), schedule.shape(k)
    if schedule.is_grid(k) and schedule.is_grid(k - 1) and len(a) == len(b):
        coords = torch.meshgrid(*[torch.arange(s, device=device) for s in b], indexing="ij")
        parent = torch.zeros((), dtype=torch.long, device=device)
        for c, sa, sb in zip(coords, a, b):
            parent = parent * sa + torch.div(c * sa, sb, rounding_mode="floor")
        return parent.reshape(-1)
    n_prev, n = schedule.token_counts[k - 1], schedule.token_counts[k]
    return torch.div(torch.arange(n, device=device) * n_prev, n, rounding_mode="floor")


def pivotal_tokens(x: torch.Tensor, keep: int) -> torch.Tensor:
    """FastVAR's pivotal tokens: ``x (B, n, C)`` -> ``(B, keep)`` long, per sample the positions
    whose input lies farthest (L2) from the mean input of the scale (its high-frequency part),
    sorted by position."""
    score = (x - x.mean(dim=1, keepdim=True)).norm(dim=-1)
    return score.topk(keep, dim=1).indices.sort(dim=1).values


class _Branch:
    """One transformer's per-generation state: condition, modulations, KV caches, positions."""

    def __init__(self, model: NextScaleTransformer, cond, cond_blocks, mods, caches, level_pos, cross=None):
        self.model, self.cond, self.cond_blocks, self.mods = model, cond, cond_blocks, mods
        self.caches, self.level_pos, self.cross = caches, level_pos, cross

    @classmethod
    def build(cls, model: NextScaleTransformer, extra_pos, condition: tuple) -> "_Branch":
        """``condition``: the run's ``(Condition, null_rows)``."""
        cond, cond_blocks, cross = model.encode_condition(*condition)
        device = cond.device
        return cls(model, cond, cond_blocks, model.modulations(cond_blocks),
                   model.new_caches(cond.shape[0], device=device),
                   model.level_pos(None if extra_pos is None else extra_pos.to(device)), cross)

    def drop_rows(self, B: int) -> None:
        """Keep the first B rows (the conditional half): condition, modulations and caches."""
        self.cond, self.cond_blocks = self.cond[:B], self.cond_blocks[:B]
        self.mods = [tuple(v[:B] for v in m) for m in self.mods]
        for c in self.caches:
            c.k, c.v = c.k[:B], c.v[:B]
        if self.cross is not None:
            self.cross = [kv.rows(slice(0, B)) for kv in self.cross]

    def embed(self, k: int, x: torch.Tensor | None, rows: int) -> torch.Tensor:
        """This model's input of scale k ``(rows, n_k, C)`` from the tokenizer's ``x (B, n_k, latent)``."""
        pos = self.level_pos
        if k == 0:
            return self.model.embed_start(self.cond, pos.repeat(2, 1, 1) if rows > pos.shape[0] > 1 else pos)
        h = self.model.embed_scale(x, k, pos if pos.shape[0] == 1 else pos[: x.shape[0]])
        return h.repeat(rows // h.shape[0], 1, 1)


class AcceleratedRunner:
    """The scale loop's transformer work under an :class:`Acceleration`: ``logits(k, h, x, t)``
    returns the ``(B, n_k, V)`` logits of scale k (guidance applied), updating the caches."""

    def __init__(self, accel: Acceleration, model: NextScaleTransformer, guided: bool,
                 cond, cond_blocks, mods, caches, level_pos, extra_pos, cross, condition):
        self.accel, self.guided = accel, guided
        self.B = cond.shape[0] // 2 if guided else cond.shape[0]
        self.K = len(model.schedule)
        self.draft = _Branch(model, cond, cond_blocks, mods, caches, level_pos, cross)
        self.refiner = None
        if accel.refiner is not None:
            _check_refiner(model, accel.refiner)
            if extra_pos is not None and accel.refiner.embed_dim != model.embed_dim:
                raise ValueError(f"extra_pos has the model's width {model.embed_dim}; a refiner of width "
                                 f"{accel.refiner.embed_dim} cannot take it (use a refiner of the same width)")
            self.refiner = _Branch.build(accel.refiner, extra_pos, condition)
        self.schedule = model.schedule
        self.prev_logits: torch.Tensor | None = None
        # the scale at which each mode starts (K: never)
        self.guidance_from = self.K - min(accel.guidance_off_last, self.K)
        self.refine_from = self.K - min(accel.refine_last, self.K) if self.refiner is not None else self.K
        self.prune_from = max(1, self.K - accel.prune_last) if accel.prune_last else self.K
        self.computed_positions: list[torch.Tensor | None] = []  # per scale: the positions recomputed (pruning)

    @property
    def rows(self) -> int:
        """Rows the transformer runs now: 2B with guidance (conditional, then unconditional), else B."""
        return 2 * self.B if self.guided else self.B

    def logits(self, k: int, h: torch.Tensor, x: torch.Tensor | None, t: float) -> torch.Tensor:
        """Logits ``(B, n_k, V)`` of scale k. ``h``: the draft model's input ``(rows, n_k, C)`` as
        :func:`msar.sample` embeds it; ``x``: the tokenizer's ``(B, n_k, latent)`` (None at k = 0);
        ``t``: the guidance weight of scale k."""
        B = self.B
        if self.guided and k == self.guidance_from:
            self.guided = False
            for br in (self.draft, self.refiner):
                if br is not None:
                    br.drop_rows(B)
        rows = self.rows
        keep = None
        if k >= self.prune_from:
            n = self.schedule.token_counts[k]
            m = max(1, math.ceil(self.accel.prune_keep * n))
            if m < n:
                keep = pivotal_tokens(x, m)  # (B, m)
        self.computed_positions.append(keep)
        active = self.refiner if k >= self.refine_from else self.draft
        out = None
        for br in (self.draft, self.refiner):
            if br is None:
                continue
            inp = h[:rows] if br is self.draft else br.embed(k, x, rows)
            if keep is not None:
                idx = keep.repeat(rows // B, 1).unsqueeze(-1).expand(-1, -1, inp.shape[-1])
                inp = inp.gather(1, idx)
            if br is not active:  # the other model only extends its KV caches (no head)
                if br is self.refiner or k < self.refine_from:
                    br.model.step(inp, br.cond, br.cond_blocks, br.caches, br.mods, head_rows=0, cross=br.cross)
                continue
            if self.guided and t == 0:  # as msar.sample: the null half only fills its KV cache
                out = br.model.step(inp, br.cond, br.cond_blocks, br.caches, br.mods, head_rows=B, cross=br.cross)
            else:
                out = br.model.step(inp, br.cond, br.cond_blocks, br.caches, br.mods, cross=br.cross)
                if self.guided:
                    out = apply_guidance(out[:B], out[B:], t)
        if keep is not None:
            parent = parent_positions(self.schedule, k, device=out.device)
            full = self.prev_logits[:, parent]  # (B, n_k, V): the cached logits, upsampled
            out = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, out.shape[-1]), out)
        self.prev_logits = out
        return out


def quantize_int8(model: NextScaleTransformer) -> NextScaleTransformer:
    """A copy of ``model`` whose linear layers are int8 dynamically quantised (weights int8 per
    tensor, activations quantised per call; ``torch.ao.quantization.quantize_dynamic``), for CPU
    sampling: ``msar.sample(quantize_int8(model), tok, ...)``.

    The attention's fused QKV projection gets its q/v biases folded into the quantised layer.
    Approximated: every linear layer's weights and inputs are rounded to 8 bits. Training and
    ``state_dict`` round trips of the copy are not supported; keep the float model for those."""
    from torch.ao.quantization import quantize_dynamic

    from .models.transformer import SelfAttention

    q = copy.deepcopy(model).eval()
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, SelfAttention):
                lin = nn.Linear(m.qkv.in_features, m.qkv.out_features, bias=True)
                lin.weight.copy_(m.qkv.weight)
                lin.bias.copy_(torch.cat((m.q_bias, m.zero_k_bias, m.v_bias)))
                m.qkv = lin
    # exact type nn.Linear only: SharedAdaLNProjection (a subclass, used once per generation) stays float
    return quantize_dynamic(q, {nn.Linear}, dtype=torch.qint8)
