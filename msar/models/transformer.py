"""The next-scale prediction transformer (VAR), for any scale schedule.

GPT-2 style pre-norm blocks whose LayerNorms are modulated by the condition
(AdaLN: per-block or one projection shared by all blocks), optional cosine
attention with a learned per-head temperature (VAR's ``attn_l2_norm``),
stochastic depth, and a class embedding that is both the start token and the
condition (row ``num_classes`` is the null class used for classifier-free
guidance and condition dropout).  Training runs all scales at once under the
block-causal mask; inference runs one scale at a time against a preallocated
KV cache::

    cond = class_embed(label)                                   # (B, C)
    h    = [cond + start_pos, input_proj(x_1..x_{K-1})]         # (B, L, C)
    h   += level_embed(level_ids) + pos_embed (+ pos_embed_coords(fourier(cell centres))) (+ extra_pos)
    for block in blocks: h = block(h, cond, block-causal mask)
    logits = head(head_norm(h, cond))                           # (B, L, V)

Other conditions (:class:`~msar.Condition`, ``cfg.cond_kind``): a vector ``(B, D)`` or a
sequence ``(B, T, D)`` with its padding mask is projected to the width; ``cond`` is the
projected vector or the masked mean of the projected sequence, and with cross-attention
every block is self-attention -> cross-attention to the sequence -> MLP::

    seq  = cond_proj(features) where mask else 0                 # (B, T, C)
    cond = sum(seq) / count(mask)                               # (B, C); null rows: class_embed[null]
    kv   = per block cross_attn.keys_values(seq, mask)          # once per generation
    for block, kv_b in zip(blocks, kv): h = block(h, cond, block-causal mask, cross=kv_b)

The reference VAR implementation names these parameters differently
(``word_embed``, ``pos_1LC``, ``ada_lin`` ...); its released checkpoints load
through the converter in ``modalities/image/checkpoint.py``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..conditioning import Condition
from ..pretrained import PretrainedMixin
from ..schedule import ScaleSchedule


# ---------------------------------------------------------------------------- building blocks
class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, ...)`` -> same shape, each sample zeroed with probability p (scaled by 1 / (1 - p))."""
        # ``training`` first: under torch.compile an eval-mode block then guards on that alone,
        # not on its own p, so blocks with different rates share one compiled graph per shape.
        if not self.training or self.p == 0.0:
            return x
        keep = 1 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class KVCache:
    """Preallocated keys/values of one attention layer: ``(B, H, L_max, head_dim)``.

    Writing a scale is a slice assignment, not a concatenation, so a whole
    generation allocates once.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.empty(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v (B, H, n, head_dim)`` after the cached positions; returns all keys and
        values so far, ``(B, H, length + n, head_dim)`` each (views of the cache)."""
        n = k.shape[2]
        end = self.length + n
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache overflow: {end} > {self.k.shape[2]} positions")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


@dataclass
class BlockCausalMask:
    """The block-causal mask ``(L, L)`` (bool or additive) of a whole sequence, and where its last
    scales start (``tail_starts``, ascending).

    Attention under it runs in pieces (:meth:`attend`): the queries before the first tail scale under
    the mask restricted to them, and each tail scale without a mask against every key up to its own
    end -- which is exactly what the block-causal mask allows.  The last scales hold most queries
    (256 of VAR's 680), so this skips the masked-out scores of the full ``(L, L)`` product (a third
    of them for VAR's schedule) and runs the largest piece with the faster unmasked kernel."""

    mask: torch.Tensor
    tail_starts: tuple[int, ...] = ()

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
               scale: float) -> torch.Tensor:
        """``q, k, v (B, H, L, hd)`` -> ``(B, H, L, hd)``, the same as SDPA under ``mask``."""
        L = q.shape[2]
        bounds = self.tail_starts + (L,)
        first = bounds[0]
        outs = []
        if first > 0:
            outs.append(F.scaled_dot_product_attention(q[:, :, :first], k[:, :, :first], v[:, :, :first],
                                                       attn_mask=self.mask[:first, :first], dropout_p=dropout_p,
                                                       scale=scale))
        for a, b in zip(bounds[:-1], bounds[1:]):
            outs.append(F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, :b], v[:, :, :b], dropout_p=dropout_p,
                                                       scale=scale))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    Fused QKV projection with a bias on q and v only (k's bias is a zero buffer, as
    in VAR).  With ``l2_norm`` q and k are unit-normalized and q is multiplied by a
    learned per-head scale ``exp(min(attn_scale, log 100))`` (``attn_scale`` is
    ``(1, H, 1, 1)``, initialised to ``log 4``); otherwise the logit scale is VAR's
    ``0.25 / sqrt(head_dim)``.
    """

    def __init__(self, dim: int, heads: int, l2_norm: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {heads}")
        self.num_heads, self.head_dim = heads, dim // heads
        self.l2_norm = l2_norm
        if l2_norm:
            self.scale = 1.0
            self.attn_scale = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
            self.max_log_scale = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """``x (B, n, C)`` -> ``(B, n, C)``.

        ``attn_mask``: bool ``(n, n)`` (True = may attend) or additive, or a
        :class:`BlockCausalMask`; ``cache``: the layer's :class:`KVCache` -- the new keys/values
        are appended and the queries attend to everything cached (no mask needed for a whole scale)."""
        B, L, C = x.shape
        if isinstance(self.qkv, nn.Linear):
            bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
            qkv = F.linear(x, self.qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        else:  # an int8 copy (msar.acceleration.quantize_int8): the quantised layer holds the q/v biases
            qkv = self.qkv(x).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        if self.l2_norm:
            scale_mul = self.attn_scale.clamp_max(self.max_log_scale).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.append(k, v)
        dropout_p = self.attn_drop if self.training else 0.0
        if isinstance(attn_mask, BlockCausalMask):  # training: attention in pieces, skipping masked-out scores
            out = attn_mask.attend(q, k, v, dropout_p, self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class FFN(nn.Module):
    """Two-layer MLP with tanh-GELU: ``(B, n, C) -> (B, n, C)``."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, n, C)`` -> ``(B, n, C)``."""
        if torch.is_grad_enabled():
            return self.drop(self.fc2(self.act(self.fc1(x))))
        # sampling: GELU in place on fc1's fresh output -- the (B, n, 4C) activation is the largest
        # tensor of a step, and on CPU every new one of that size costs page faults
        return self.drop(self.fc2(torch.ops.aten.gelu_(self.fc1(x), approximate="tanh")))


class SharedAdaLNProjection(nn.Linear):
    """One AdaLN projection for all blocks: ``(B, D) -> (B, 1, 6, C)``."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        """``cond (B, D)`` -> ``(B, 1, 6, C)``."""
        C = self.weight.shape[0] // 6
        return super().forward(cond).view(-1, 1, 6, C)


def _modulate(normed: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``normed * (1 + scale) + shift`` (VAR's op order, so results are bitwise VAR's).

    Without autograd (sampling) the product is taken in place on the fresh LayerNorm
    output, saving a ``(B, n, C)`` temporary per block and scale; with autograd it is
    out of place so no saved tensor is overwritten."""
    if torch.is_grad_enabled():
        return normed.mul(scale.add(1)).add_(shift)
    return normed.mul_(scale.add(1)).add_(shift)


class AdaLNBlock(nn.Module):
    """Pre-norm attention + MLP block with AdaLN modulation and gates.

    The condition yields six ``(B, 1, C)`` vectors ``gamma1, gamma2, scale1, scale2,
    shift1, shift2``:  ``x += gamma1 * attn(norm(x) * (1 + scale1) + shift1)`` and the
    same for the MLP.  Per-block AdaLN projects the condition with ``adaln_proj``
    (SiLU + linear ``D -> 6C``); with ``shared_aln`` the model projects once for all
    blocks and each block adds its learned ``adaln_offset (1, 1, 6, C)``.
    """

    def __init__(self, dim: int, cond_dim: int, heads: int, mlp_ratio: float = 4.0, shared_aln: bool = False,
                 l2_norm: bool = False, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.shared_aln = shared_aln
        self.attn = SelfAttention(dim, heads, l2_norm=l2_norm, attn_drop=attn_drop, proj_drop=drop)
        self.ffn = FFN(dim, round(dim * mlp_ratio), drop=drop)
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)  # affine comes from AdaLN
        # DropPath even at rate 0 (an identity then): every block has the same module types, so
        # blocks compiled separately share their graphs (no recompile per block type).
        self.drop_path = DropPath(drop_path)
        if shared_aln:
            self.adaln_offset = nn.Parameter(torch.randn(1, 1, 6, dim) / dim ** 0.5)
        else:
            self.adaln_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The six AdaLN vectors ``(gamma1, gamma2, scale1, scale2, shift1, shift2)``, each ``(B, 1, C)``.

        ``cond``: the class embedding ``(B, D)``, or with ``shared_aln`` the shared
        projection ``(B, 1, 6, C)``."""
        if self.shared_aln:
            return (self.adaln_offset + cond).unbind(2)
        return self.adaln_proj(cond).view(-1, 1, 6, self.dim).unbind(2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, mod: tuple[torch.Tensor, ...] | None = None,
                cross: "CrossKV" | None = None) -> torch.Tensor:
        """``x (B, n, C)`` -> ``(B, n, C)`` under the condition ``cond`` (see :meth:`modulation`).

        ``mod``: this block's :meth:`modulation` precomputed by the sampler (it depends on
        the condition only, so computing it once per generation saves depth x K matmuls);
        ``cross``: this block's :class:`CrossKV` (only a :class:`CrossAttnBlock` takes one)."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond) if mod is None else mod
        h = self.attn(_modulate(self.norm(x), scale1, shift1), attn_mask=attn_mask, cache=cache)
        x = x + self.drop_path(h.mul_(gamma1))
        if cross is not None:
            x = x + self.drop_path(self.cross_attn(x, cross))
        h = self.ffn(_modulate(self.norm(x), scale2, shift2))
        return x + self.drop_path(h.mul(gamma2))


class CrossKV:
    """One block's cross-attention keys and values for a generation: ``k, v (B, H, T, head_dim)``,
    ``mask (B, 1, 1, T)`` bool (True = real token; a row without any attends to all and is then
    zeroed by ``valid``), ``valid (B, 1, 1)`` (0. for such a row).  Computed once per generation
    and reused at every scale."""

    __slots__ = ("k", "v", "mask", "valid")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor):
        self.k, self.v, self.mask, self.valid = k, v, mask, valid

    def rows(self, rows: slice) -> "CrossKV":
        """The same keys / values for the rows ``rows`` of the batch."""
        return CrossKV(self.k[rows], self.v[rows], self.mask[rows], self.valid[rows])


class CrossAttention(nn.Module):
    """Pre-norm multi-head attention from the tokens ``(B, n, C)`` to a condition sequence
    ``(B, T, C)`` under its padding mask; the output projection starts at zero
    (``TransformerConfig.init_cross_attn``), so a fresh block is its class-model self."""

    def __init__(self, dim: int, heads: int, norm_eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, context: torch.Tensor, mask: torch.Tensor) -> CrossKV:
        """``context (B, T, C)``, ``mask (B, T)`` bool -> this layer's :class:`CrossKV`."""
        B, T, C = context.shape
        k, v = self.kv(context).view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        has = mask.any(1)
        # a fully padded row would give softmax(-inf...) = NaN: it attends to everything, then is zeroed
        attn = (mask | ~has.unsqueeze(1)).view(B, 1, 1, T)
        return CrossKV(k, v, attn, has.view(B, 1, 1).to(k.dtype))

    def forward(self, x: torch.Tensor, kv: CrossKV) -> torch.Tensor:
        """``x (B, n, C)`` -> ``(B, n, C)``: attention of ``norm(x)`` to the condition in ``kv``."""
        B, n, C = x.shape
        q = self.q(self.norm(x)).view(B, n, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=kv.mask)
        return self.proj(out.transpose(1, 2).reshape(B, n, C)) * kv.valid


class CrossAttnBlock(AdaLNBlock):
    """:class:`AdaLNBlock` with cross-attention to the condition sequence between self-attention
    and MLP: ``x += gamma1 attn(...); x += cross_attn(x, cond seq); x += gamma2 mlp(...)``
    (:meth:`AdaLNBlock.forward` with its ``cross`` keys / values; None skips the cross-attention)."""

    def __init__(self, dim: int, cond_dim: int, heads: int, mlp_ratio: float = 4.0, shared_aln: bool = False,
                 l2_norm: bool = False, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-6):
        super().__init__(dim, cond_dim, heads, mlp_ratio, shared_aln, l2_norm, drop, attn_drop, drop_path, norm_eps)
        self.cross_attn = CrossAttention(dim, heads, norm_eps)


class AdaLNBeforeHead(nn.Module):
    """Final AdaLN (scale and shift only) before the output projection."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.adaln_proj = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``x (B, n, C)``, class embedding ``cond (B, D)`` -> ``(B, n, C)``."""
        scale, shift = self.adaln_proj(cond).view(-1, 1, 2, self.dim).unbind(2)
        return _modulate(self.norm(x), scale, shift)


# ---------------------------------------------------------------------------- the model
@dataclass
class TransformerConfig:
    """Hyper-parameters of :class:`NextScaleTransformer`.

    ``schedule`` is a :class:`ScaleSchedule` (kept as given, a subclass included, and saved
    with its type by ``save_pretrained``) or a list of scales; ``latent_dim`` is
    the tokenizer's codeword size; ``num_classes = 0`` gives an unconditional model
    (only the null class).  The ``init_*`` fields are VAR's initialisation, applied
    at construction (see :meth:`NextScaleTransformer.init_weights`): ``init_std < 0``
    means ``sqrt(1 / (3 embed_dim))``.
    """

    schedule: list | ScaleSchedule
    vocab_size: int
    latent_dim: int
    num_classes: int = 0
    depth: int = 4
    embed_dim: int = 256
    num_heads: int = 4
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    shared_aln: bool = False
    attn_l2_norm: bool = True
    cond_drop_rate: float = 0.1
    norm_eps: float = 1e-6
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0
    # "softmax": a V-way classifier per token; "bitwise": ``bits`` binary classifiers (V = 2^bits,
    # logits (B, L, bits)) for the tokens of msar.BitwiseQuantizer, trained with per-bit BCE
    head: str = "softmax"
    bits: int = 0
    # the condition (msar.Condition): "classes" (labels, VAR), "vector" (B, cond_dim) or "sequence"
    # (B, T, cond_dim) + padding mask; cross_attention None = on for "sequence" only; init_cross_attn
    # scales the cross-attention output projection at init (0: a fresh model ignores the sequence
    # except through its pooled mean, like the class model)
    cond_kind: str = "classes"
    cond_dim: int = 0
    cross_attention: bool | None = None
    init_cross_attn: float = 0.0
    # coordinate positions: > 0 adds a learned projection of the tokens' cell centres
    # (ScaleSchedule.token_coordinates, sin/cos at this many octaves per axis) to the learned
    # per-position embedding, so the same place at another scale or in another frame starts
    # with a similar position; 0 (VAR) learns every position on its own.  Grid schedules only.
    coord_frequencies: int = 0
    # candidate scoring: > 0 adds to every token's logit a bilinear score of the hidden state and that
    # token's own features ``(B, n, V, candidate_dim)``, which the tokenizer computes from the scale's
    # input (msar.tokenizer.CandidateFeatures); 0 (VAR): the linear head alone.  Softmax head only.
    candidate_dim: int = 0

    @classmethod
    def var(cls, depth: int, schedule: list, vocab_size: int = 4096, latent_dim: int = 32,
            num_classes: int = 1000, shared_aln: bool = False, **kw) -> "TransformerConfig":
        """VAR's recipe: width 64 x depth, heads = depth, cosine attention, drop-path 0.1 x depth / 24."""
        return cls(schedule=schedule, vocab_size=vocab_size, latent_dim=latent_dim, num_classes=num_classes,
                   depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
                   shared_aln=shared_aln, attn_l2_norm=True, **kw)


def fourier_features(coords: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """``coords (L, D)`` in ``[0, 1]`` -> ``(L, 2 * num_frequencies * D)``: ``sin`` and ``cos`` of
    ``2^j * pi * c`` for ``j < num_frequencies`` (octave j resolves cells of side ``2^-j``)."""
    freqs = math.pi * 2.0 ** torch.arange(num_frequencies, dtype=torch.float32)  # (F,)
    angles = (coords.float().unsqueeze(-1) * freqs).flatten(1)                     # (L, D * F)
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def uses_cross_attention(cfg: TransformerConfig) -> bool:
    """Whether blocks cross-attend to the condition; checks the condition fields of ``cfg``."""
    if cfg.cond_kind not in ("classes", "vector", "sequence"):
        raise ValueError(f"cond_kind must be 'classes', 'vector' or 'sequence', got {cfg.cond_kind!r}")
    if cfg.cond_kind == "classes":
        if cfg.cross_attention:
            raise ValueError("cross_attention needs a 'vector' or 'sequence' condition (cond_kind), not class labels")
        return False
    if not (isinstance(cfg.cond_dim, int) and cfg.cond_dim >= 1):
        raise ValueError(f"a {cfg.cond_kind!r} condition needs its feature size cond_dim >= 1, got {cfg.cond_dim!r}")
    if cfg.num_classes != 0:
        raise ValueError(f"num_classes must be 0 for a {cfg.cond_kind!r} condition (the one class embedding row is "
                         f"its learned null condition), got {cfg.num_classes}")
    return cfg.cond_kind == "sequence" if cfg.cross_attention is None else bool(cfg.cross_attention)


def head_outputs(cfg: TransformerConfig) -> int:
    """Logits per token: V (softmax head) or ``bits`` (bitwise head, which needs ``V = 2^bits``)."""
    if cfg.head == "softmax":
        return cfg.vocab_size
    if cfg.head != "bitwise":
        raise ValueError(f"head must be 'softmax' or 'bitwise', got {cfg.head!r}")
    if not (isinstance(cfg.bits, int) and cfg.bits >= 1 and cfg.vocab_size == 2 ** cfg.bits):
        raise ValueError(f"a bitwise head needs bits >= 1 with vocab_size = 2^bits, got bits={cfg.bits!r}, "
                         f"vocab_size={cfg.vocab_size}")
    return cfg.bits


class NextScaleTransformer(PretrainedMixin, nn.Module):
    """VAR's transformer over a :class:`ScaleSchedule`.

    ``forward(labels (B,), x (B, L - n_0, latent_dim)) -> logits (B, L, vocab_size)``:
    teacher forcing under the block-causal mask.  :meth:`step` runs one scale against
    KV caches.  A raster (next-token) model is the same class with
    ``ScaleSchedule.raster(N)``.  Weights are initialised with VAR's recipe at
    construction (scales from the config's ``init_*`` fields).

    With ``cfg.head == "bitwise"`` the logits are ``(B, L, bits)``, one per bit of the token
    (:mod:`msar.bitwise`); everything else is unchanged.

    Attributes: ``vocab_size`` (V), ``latent_dim``, ``embed_dim`` (C), ``seq_len``
    (L, tokens over all scales), ``first_len`` (n_0, tokens of scale 0),
    ``num_classes``, ``null_label`` (= ``num_classes``).
    """

    config_class = TransformerConfig  # save_pretrained / from_pretrained

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = self.config = cfg
        # a ScaleSchedule keeps its type (a subclass such as a per-frame video schedule)
        self.schedule = cfg.schedule if isinstance(cfg.schedule, ScaleSchedule) else ScaleSchedule(cfg.schedule)
        s = self.schedule
        self.vocab_size, self.latent_dim, self.embed_dim = cfg.vocab_size, cfg.latent_dim, cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.depth, self.num_heads = cfg.depth, cfg.num_heads
        self.seq_len, self.first_len = s.L, s.first_len
        self.cond_drop_rate = cfg.cond_drop_rate
        self.cond_kind, self.cond_dim = cfg.cond_kind, cfg.cond_dim
        self.cross_attention = uses_cross_attention(cfg)
        C = self.embed_dim
        init_std = math.sqrt(1 / C / 3)

        self.input_proj = nn.Linear(self.latent_dim, C)
        self.class_embed = nn.Embedding(self.num_classes + 1, C)  # last row: null class
        self.start_pos = nn.Parameter(torch.empty(1, self.first_len, C))
        self.pos_embed = nn.Parameter(torch.empty(1, self.seq_len, C))
        self.level_embed = nn.Embedding(len(s), C)
        n_freq = cfg.coord_frequencies
        if not (isinstance(n_freq, int) and not isinstance(n_freq, bool) and n_freq >= 0):
            raise ValueError(f"coord_frequencies must be an int >= 0, got {n_freq!r}")
        if n_freq and not all(s.is_grid(k) for k in range(len(s))):
            raise ValueError(f"coord_frequencies={n_freq} needs a schedule of grid scales (token coordinates), got {s}")
        # named *pos_embed* so that it shares pos_embed's no-weight-decay rule (training.optim)
        self.pos_embed_coords = nn.Linear(2 * n_freq * s.rank, C, bias=False) if n_freq else None
        for t in (self.class_embed.weight, self.start_pos, self.pos_embed, self.level_embed.weight):
            nn.init.trunc_normal_(t.data, mean=0, std=init_std)

        self.shared_adaln_proj = (nn.Sequential(nn.SiLU(), SharedAdaLNProjection(C, 6 * C))
                                  if cfg.shared_aln else nn.Identity())
        # linearly increasing stochastic depth (plain Python so the model can be built on the meta device)
        dpr = [cfg.drop_path_rate * i / (cfg.depth - 1) if cfg.depth > 1 else 0.0 for i in range(cfg.depth)]
        block_class = CrossAttnBlock if self.cross_attention else AdaLNBlock
        self.blocks = nn.ModuleList([
            block_class(C, C, cfg.num_heads, cfg.mlp_ratio, cfg.shared_aln, cfg.attn_l2_norm,
                       cfg.drop_rate, cfg.attn_drop_rate, dpr[i], cfg.norm_eps)
            for i in range(cfg.depth)
        ])
        self.head_norm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, head_outputs(cfg))
        if not (isinstance(cfg.candidate_dim, int) and cfg.candidate_dim >= 0):
            raise ValueError(f"candidate_dim must be an int >= 0, got {cfg.candidate_dim!r}")
        if cfg.candidate_dim and cfg.head != "softmax":
            raise ValueError("candidate scoring (candidate_dim > 0) needs the softmax head")
        # hidden state -> a weight per candidate feature: logit_v += <candidate_query(h), features_v>
        self.candidate_query = nn.Linear(C, cfg.candidate_dim) if cfg.candidate_dim else None
        if self.cond_kind != "classes":  # features (D) -> width C; class_embed's one row is the null condition
            self.cond_proj = nn.Linear(cfg.cond_dim, C)
        if self.cross_attention:  # the null condition's sequence: one learned token
            self.null_context = nn.Parameter(torch.empty(1, C))
            nn.init.trunc_normal_(self.null_context.data, mean=0, std=init_std)

        self._tail_memo = None  # _unmasked_tail's last answer, keyed by the mask it checked
        self.build_buffers()
        self.init_weights()

    def build_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)create the buffers derived from the schedule, which are not saved: ``level_ids``
        ``(L,)`` (the scale of every position) and the block-causal ``attn_mask`` ``(L, L)``.
        Needed after ``to_empty`` on a model built on the meta device."""
        self.register_buffer("level_ids", self.schedule.level_ids(device), persistent=False)
        self.register_buffer("attn_mask", self.schedule.attn_mask("bool", device=device), persistent=False)
        if self.cfg.coord_frequencies:  # (L, 2 * F * rank), fixed by the schedule
            coords = fourier_features(self.schedule.token_coordinates(), self.cfg.coord_frequencies)
            self.register_buffer("coord_features", coords.to(device), persistent=False)

    @property
    def null_label(self) -> int:
        """The null class (``num_classes``): the unconditional branch of guidance and condition dropout."""
        return self.num_classes

    # ------------------------------------------------------------------ init (VAR's recipe)
    @torch.no_grad()
    def init_weights(self, init_adaln: float | None = None, init_adaln_gamma: float | None = None,
                     init_head: float | None = None, init_std: float | None = None) -> "NextScaleTransformer":
        """VAR's initialisation (the constructor already applies it with the config's values;
        an argument left at ``None`` takes the config's ``init_*`` field).

        Every linear and embedding weight ~ truncated normal(``init_std``; ``< 0`` means
        ``sqrt(1 / 3C)``), biases 0; the head weight is scaled by ``init_head``; the output
        projections of attention and MLP by ``1 / sqrt(2 depth)``; AdaLN scale/shift rows by
        ``init_adaln`` and gate rows by ``init_adaln_gamma`` -- small gates start every block
        close to the identity.  Returns ``self``."""
        cfg = self.cfg
        init_adaln = cfg.init_adaln if init_adaln is None else init_adaln
        init_adaln_gamma = cfg.init_adaln_gamma if init_adaln_gamma is None else init_adaln_gamma
        init_head = cfg.init_head if init_head is None else init_head
        init_std = cfg.init_std if init_std is None else init_std
        C = self.embed_dim
        if init_std < 0:
            init_std = (1 / C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=init_std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        if self.candidate_query is not None:
            self.candidate_query.weight.mul_(init_head)
            self.candidate_query.bias.zero_()
        self.head_norm.adaln_proj[-1].weight.mul_(init_adaln)
        self.head_norm.adaln_proj[-1].bias.zero_()
        for b in self.blocks:
            b.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if isinstance(b, CrossAttnBlock):
                b.cross_attn.proj.weight.mul_(cfg.init_cross_attn)
            if b.shared_aln:
                b.adaln_offset[:, :, 2:].mul_(init_adaln)
                b.adaln_offset[:, :, :2].mul_(init_adaln_gamma)
            else:
                w = b.adaln_proj[-1].weight
                w[2 * C:].mul_(init_adaln)
                w[:2 * C].mul_(init_adaln_gamma)
                b.adaln_proj[-1].bias.zero_()
        return self

    # ------------------------------------------------------------------ validation
    def check_labels(self, labels: torch.Tensor, allow_null: bool = False) -> torch.Tensor:
        """Validate class labels ``(B,)`` and return them as a long tensor.

        Labels must lie in ``[0, num_classes - 1]``; the null class ``num_classes`` is
        accepted only with ``allow_null=True`` (unconditional passes).  For an
        unconditional model (``num_classes = 0``) the null class 0 is the only label."""
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels: expected a 1-D integer tensor (B,), got shape {tuple(labels.shape)} dtype {labels.dtype}")
        nc = self.num_classes
        hi = nc if (allow_null or nc == 0) else nc - 1
        # the range check reads the labels back to the host, which neither a compiled graph nor a
        # CUDA-graph capture can do: skipped there (eager calls before them have checked)
        compiling = hasattr(torch, "compiler") and torch.compiler.is_compiling()
        capturing = labels.is_cuda and torch.cuda.is_current_stream_capturing()
        if labels.numel() and not compiling and not capturing and (int(labels.min()) < 0 or int(labels.max()) > hi):
            got = f"got min {int(labels.min())}, max {int(labels.max())}"
            if nc == 0:
                raise ValueError(f"labels: this model is unconditional (num_classes = 0): every label must be 0, "
                                 f"the null class; {got}")
            if allow_null:
                raise ValueError(f"labels: class labels must lie in [0, num_classes] = [0, {nc}] ({nc} = the null "
                                 f"class); {got}")
            null_hint = (f" (label {nc} is the null class: pass allow_null=True / model.null_label for an "
                         f"unconditional pass)" if int(labels.max()) == nc and int(labels.min()) >= 0 else "")
            raise ValueError(f"labels: class labels must lie in [0, num_classes - 1] = [0, {nc - 1}]; the null class "
                             f"({nc}) is used only for guidance / dropout; {got}{null_hint}")
        return labels.long()

    def check_condition(self, condition: "Condition | torch.Tensor", batch_size: int | None = None,
                        allow_null: bool = False) -> Condition:
        """Validate a condition for this model and return it as a :class:`Condition`: a label
        tensor or ``Condition.classes`` for a class model (labels checked as in
        :meth:`check_labels`), a ``Condition.vector`` / ``Condition.sequence`` with the model's
        ``cond_dim`` otherwise; ``batch_size``: the batch it must have; ``allow_null``: accept
        the null class in class labels (as :meth:`check_labels`)."""
        kind = self.cond_kind
        if not isinstance(condition, Condition):
            if kind != "classes":
                want = ("Condition.vector(features (B, D))" if kind == "vector"
                        else "Condition.sequence(features (B, T, D), mask (B, T))")
                got = (f"a tensor of shape {tuple(condition.shape)}" if isinstance(condition, torch.Tensor)
                       else type(condition).__name__)
                raise ValueError(f"this model is conditioned on {kind} conditions (cond_kind={kind!r}, "
                                 f"D = cond_dim = {self.cond_dim}): pass msar.{want}, got {got}")
            condition = Condition.classes(self.check_labels(condition, allow_null=allow_null))
        elif condition.kind != kind:
            raise ValueError(f"this model takes {kind} conditions (cond_kind={kind!r}), got a {condition.kind} "
                             f"Condition")
        elif kind == "classes":
            self.check_labels(condition.labels, allow_null=allow_null)
        elif condition.dim != self.cond_dim:
            raise ValueError(f"the Condition's feature size D = {condition.dim} does not match the model's "
                             f"cond_dim = {self.cond_dim} (features {tuple(condition.features.shape)})")
        if batch_size is not None and condition.batch_size != batch_size:
            raise ValueError(f"the condition has batch size {condition.batch_size} but the input has batch size "
                             f"{batch_size}")
        return condition

    def _check_input(self, x: torch.Tensor, B: int) -> None:
        want = (B, self.seq_len - self.first_len, self.latent_dim)
        if x.dim() != 3 or tuple(x.shape) != want:
            raise ValueError(f"teacher-forcing input: expected shape {want} (B, L - first_len, latent_dim), "
                             f"got {tuple(x.shape)}")

    def _check_extra_pos(self, extra_pos: torch.Tensor) -> None:
        if (extra_pos.dim() != 3 or tuple(extra_pos.shape[1:]) != (self.seq_len, self.embed_dim)):
            raise ValueError(f"extra_pos: expected shape (B or 1, {self.seq_len}, {self.embed_dim}) "
                             f"(B or 1, L, embed_dim), got {tuple(extra_pos.shape)}")

    # ------------------------------------------------------------------ pieces shared by training and inference
    def condition(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Labels ``(B,)`` (not validated; null class allowed) -> (class embedding ``(B, C)``,
        block condition: the same ``(B, C)``, or with ``shared_aln`` the shared AdaLN
        projection ``(B, 1, 6, C)``)."""
        cond = self.class_embed(labels)
        return cond, self.shared_adaln_proj(cond)

    def encode_condition(self, condition: Condition, null_rows: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, list[CrossKV] | None]:
        """A validated :class:`Condition` (see :meth:`check_condition`) -> ``(cond (B, C), cond_blocks,
        cross)``: ``cond`` is the start token and AdaLN input (class embedding, projected vector,
        or masked mean of the projected sequence), ``cond_blocks`` as in :meth:`condition`,
        ``cross`` one :class:`CrossKV` per block (None without cross-attention).

        ``null_rows (B,)`` bool: rows that get the learned null condition instead (guidance's
        unconditional half, condition dropout): the null class embedding and, for cross-attention,
        the one ``null_context`` token."""
        if condition.kind == "classes":
            labels = condition.labels
            if null_rows is not None:
                labels = torch.where(null_rows, torch.full_like(labels, self.num_classes), labels)
            cond, cond_blocks = self.condition(labels)
            return cond, cond_blocks, None
        feats = condition.features.to(self.class_embed.weight.dtype)  # (a quantised cond_proj has no .weight)
        if condition.kind == "vector":
            pooled = self.cond_proj(feats)                                   # (B, C)
            context, mask = pooled.unsqueeze(1), torch.ones_like(pooled[:, :1], dtype=torch.bool)
        else:
            mask = condition.mask
            # where, not a product: padded features (even inf / NaN) must not reach the result
            context = torch.where(mask.unsqueeze(-1), self.cond_proj(feats), 0.0)   # (B, T, C)
            pooled = context.sum(1) / mask.sum(1, keepdim=True).to(context.dtype)
        if null_rows is not None:
            pooled = torch.where(null_rows.unsqueeze(1), self.class_embed.weight[self.num_classes], pooled)
            if self.cross_attention:
                first = torch.zeros_like(mask[:1])
                first[:, 0] = True
                null_ctx = torch.where(first.unsqueeze(-1), self.null_context, 0.0)       # (1, T, C)
                context = torch.where(null_rows.view(-1, 1, 1), null_ctx, context)
                mask = torch.where(null_rows.unsqueeze(1), first, mask)
        cross = [b.cross_attn.keys_values(context, mask) for b in self.blocks] if self.cross_attention else None
        return pooled, self.shared_adaln_proj(pooled), cross

    def level_pos(self, extra_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Level + position embedding ``(1, L, C)``, plus the adapter's ``extra_pos``
        ``(B or 1, L, C)`` when given (then ``(B or 1, L, C)``)."""
        pos = self.level_embed(self.level_ids).unsqueeze(0) + self.pos_embed
        if self.pos_embed_coords is not None:
            pos = pos + self.pos_embed_coords(self.coord_features).unsqueeze(0)
        if extra_pos is not None:
            self._check_extra_pos(extra_pos)
            pos = pos + extra_pos
        return pos

    def logits(self, h: torch.Tensor, cond: torch.Tensor, candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``(B, n, C)`` and class embedding ``(B, C)`` -> float32 logits ``(B, n, V)``.

        ``candidates``: with ``candidate_dim > 0``, the ``(B, n, V, F)`` features of every token of
        these positions; each logit gets ``<candidate_query(h), features>`` added (``None``: no
        features, e.g. the start scale)."""
        x = self.head_norm(h.float(), cond).float()
        out = self.head(x).float()
        if candidates is not None:
            self._check_candidates(candidates, out.shape)
            out = out + torch.einsum("bnf,bnvf->bnv", self.candidate_query(x).float(), candidates.float())
        return out

    def _check_candidates(self, candidates: torch.Tensor, logits_shape: tuple) -> None:
        F_ = self.cfg.candidate_dim
        if not F_:
            raise ValueError("candidates given to a model without candidate scoring (candidate_dim = 0)")
        if candidates.dim() != 4 or tuple(candidates.shape) != (*logits_shape, F_):
            raise ValueError(f"candidates: expected (B, n, V, candidate_dim) = {(*logits_shape, F_)}, "
                             f"got {tuple(candidates.shape)}")

    def _unmasked_tail(self, mask: torch.Tensor | None, scales: int = 2) -> tuple[int, ...]:
        """Start positions of the last ``scales`` scales (scale 0 excluded) if ``mask`` lets each of
        them attend to exactly the keys up to its own end (true of the block-causal bool mask;
        checked because ``attn_mask`` may be replaced), else ``()``."""
        if mask is None or mask.dtype != torch.bool or mask.shape != (self.seq_len, self.seq_len):
            return ()
        # the check reads the mask back to the host (a device sync on GPU): once per mask tensor and
        # in-place version, not at every training step
        memo = self._tail_memo  # (the mask itself, so that its id cannot be reused, version, scales, answer)
        if memo is not None and memo[0] is mask and memo[1:3] == (mask._version, scales):
            return memo[3]
        K = len(self.schedule)
        starts = tuple(self.schedule.slice(k).start for k in range(max(K - scales, 1), K))
        ends = starts[1:] + (self.seq_len,)
        ok = all(bool(mask[a:b, :b].all()) and not bool(mask[a:b, b:].any()) for a, b in zip(starts, ends))
        self._tail_memo = (mask, mask._version, scales, starts if ok else ())
        return self._tail_memo[3]

    # ------------------------------------------------------------------ training forward
    def forward(self, labels: "torch.Tensor | Condition", x: torch.Tensor, extra_pos: torch.Tensor | None = None,
                allow_null: bool = False, null_rows: torch.Tensor | None = None,
                candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            labels: the condition: ``(B,)`` class labels in ``[0, num_classes - 1]`` (or
                ``Condition.classes``) for a class model, a :class:`~msar.Condition` of the
                model's ``cond_kind`` otherwise; during training a fraction ``cond_drop_rate``
                of the rows gets the null condition.
            x: ``(B, L - n_0, latent_dim)`` teacher-forcing input from the tokenizer.
            extra_pos: optional ``(B or 1, L, C)`` positions supplied by the adapter
                (e.g. embedded cell centres), added to the level + position embedding.
            allow_null: accept the null class ``num_classes`` (``model.null_label``) in
                ``labels``, for an unconditional pass.
            null_rows: optional ``(B,)`` bool, rows that get the null condition (the
                unconditional branch of guidance).
            candidates: ``(B, L - n_0, V, candidate_dim)`` features of every token at the positions
                of ``x`` (models with ``candidate_dim > 0``: the tokenizer's
                ``candidate_features(x)``); the start scale has none.
        Returns:
            ``(B, L, V)`` logits.
        """
        B = x.shape[0]
        condition = self.check_condition(labels, B, allow_null=allow_null)
        self._check_input(x, B)
        if self.cfg.candidate_dim and candidates is None:
            raise ValueError("this model scores candidates (candidate_dim > 0): pass candidates= "
                             "(the tokenizer's candidate_features(x))")
        if candidates is not None:  # before the blocks run, not after
            self._check_candidates(candidates, (*x.shape[:2], self.vocab_size))
        drop = null_rows
        if self.training:  # condition dropout; an all-False mask at rate 0 (no random draw) keeps the null
            # parameters of a conditioned model in the graph, which DDP without find_unused_parameters needs
            drop = (torch.rand(B, device=x.device) < self.cond_drop_rate if self.cond_drop_rate > 0
                    else torch.zeros(B, dtype=torch.bool, device=x.device))
            drop = drop if null_rows is None else drop | null_rows
        cond, cond_blocks, cross = self.encode_condition(condition.to(x.device), drop)
        if extra_pos is not None and extra_pos.shape[0] not in (1, B):
            raise ValueError(f"extra_pos has batch size {extra_pos.shape[0]} but the input has batch size {B}")
        sos = cond.unsqueeze(1).expand(B, self.first_len, -1) + self.start_pos.expand(B, self.first_len, -1)
        h = torch.cat((sos, self.input_proj(x.float())), dim=1)
        h = h + self.level_pos(extra_pos)
        mask = self.attn_mask
        tail = self._unmasked_tail(mask)
        if tail:
            # the last two scales attend without a mask (BlockCausalMask.attend): exact, and a third
            # fewer attention scores for VAR's schedule
            mask = BlockCausalMask(mask, tail)
        for b, kv in zip(self.blocks, cross or [None] * len(self.blocks)):
            h = b(h, cond_blocks, attn_mask=mask, cross=kv)
        if candidates is None:
            return self.logits(h, cond)
        n0 = self.first_len
        return torch.cat((self.logits(h[:, :n0], cond), self.logits(h[:, n0:], cond, candidates)), dim=1)

    # ------------------------------------------------------------------ incremental inference
    def new_caches(self, batch: int, device=None, dtype=None) -> list[KVCache]:
        """One empty :class:`KVCache` per block for ``batch`` sequences of up to L tokens.

        ``dtype`` defaults to the compute dtype: the autocast dtype when autocast is on for the
        device (keys and values are produced in it), else the parameters' dtype."""
        p = self.pos_embed
        device = torch.device(device) if device is not None else p.device
        if dtype is None:
            # an fp32 cache under bf16 autocast doubles the cache (~40 GB at d30, batch 64) and makes
            # attention read fp32 keys and values that were computed in bf16 anyway
            dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
                     else p.dtype)
        return [KVCache(batch, self.num_heads, self.seq_len, self.embed_dim // self.num_heads, device, dtype)
                for _ in range(self.depth)]

    def _positions(self, lvl_pos: torch.Tensor | None, extra_pos: torch.Tensor | None) -> torch.Tensor:
        if lvl_pos is None:
            return self.level_pos(extra_pos)
        if extra_pos is not None:
            raise ValueError("pass extra_pos or lvl_pos, not both (lvl_pos = level_pos(extra_pos) already holds it)")
        return lvl_pos

    def embed_start(self, cond: torch.Tensor, lvl_pos: torch.Tensor | None = None,
                    extra_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Input of scale 0: start token(s) ``(B, n_0, C)`` from the class embedding ``cond (B, C)``.

        ``lvl_pos``: :meth:`level_pos` precomputed once per generation ``(B or 1, L, C)``;
        or ``extra_pos (B or 1, L, C)``, the adapter's positions over the whole sequence
        (the slice of scale 0 is taken here)."""
        lvl_pos = self._positions(lvl_pos, extra_pos)
        B = cond.shape[0]
        return (cond.unsqueeze(1).expand(B, self.first_len, -1) + self.start_pos.expand(B, self.first_len, -1)
                + lvl_pos[:, :self.first_len])

    def embed_scale(self, x: torch.Tensor, k: int, lvl_pos: torch.Tensor | None = None,
                    extra_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Input of scale ``k >= 1``: the tokenizer's ``(B, n_k, latent_dim)`` -> ``(B, n_k, C)``.

        ``lvl_pos`` / ``extra_pos`` as in :meth:`embed_start` (full length L; the slice of
        scale k is taken here)."""
        lvl_pos = self._positions(lvl_pos, extra_pos)
        return self.input_proj(x) + lvl_pos[:, self.schedule.slice(k)]

    def modulations(self, cond_blocks: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per block, its six AdaLN vectors ``(B, 1, C)`` for this condition (constant over
        the scales, so the sampler computes them once per generation)."""
        return [b.modulation(cond_blocks) for b in self.blocks]

    def step(self, h: torch.Tensor, cond: torch.Tensor, cond_blocks: torch.Tensor,
             caches: Sequence[KVCache], mods: Sequence[tuple[torch.Tensor, ...]] | None = None,
             head_rows: int | None = None, cross: Sequence[CrossKV] | None = None,
             candidates: torch.Tensor | None = None) -> torch.Tensor:
        """Run the tokens of one scale ``h (B, n_k, C)`` through all blocks, extending the
        KV caches; returns ``(B, n_k, V)`` logits. No mask is needed: a scale sees
        everything cached so far and all of itself.

        ``cond`` / ``cond_blocks``: from :meth:`condition`; ``mods``: precomputed
        :meth:`modulations`; ``head_rows``: only the first rows need logits (the
        unconditional half when its guidance weight is 0 needs only its KV cache);
        then the result is ``(head_rows, n_k, V)``; ``cross``: the per-block :class:`CrossKV`
        from :meth:`encode_condition` (models with cross-attention); ``candidates``: the
        ``(rows, n_k, V, candidate_dim)`` token features of :meth:`logits` for the rows that get
        logits (``None`` at the start scale).  With guidance (twice the rows) one set serves both
        halves: the features come from the shared input."""
        if self.cfg.candidate_dim and candidates is None and caches[0].length > 0:  # past the start scale
            raise ValueError("this model scores candidates (candidate_dim > 0): pass candidates= "
                             "(the tokenizer's candidate_features of this scale's input)")
        mods = mods if mods is not None else [None] * len(self.blocks)
        for b, c, m, kv in zip(self.blocks, caches, mods, cross or [None] * len(self.blocks)):
            h = b(h, cond_blocks, attn_mask=None, cache=c, mod=m, cross=kv)
        if head_rows is not None:
            h, cond = h[:head_rows], cond[:head_rows]
        if candidates is not None and candidates.shape[0] != h.shape[0]:
            candidates = candidates.repeat(h.shape[0] // candidates.shape[0], 1, 1, 1)
        return self.logits(h, cond, candidates)

    def compile_blocks(self, **kwargs: Any) -> "NextScaleTransformer":
        """``torch.compile`` every transformer block in place (``dynamic=False`` unless given;
        other keywords go to ``Module.compile``); returns ``self``.

        Faster sampling on a GPU: the blocks share one compiled graph per scale shape, and the first
        call pays the compile time. On one H200 (bf16, batch 64, cfg on) VAR d16 went from 279 to
        451 images/s and d30 from 80 to 117 (``benchmarks.gpu_check``)."""
        import torch._dynamo
        kwargs.setdefault("dynamic", False)
        # one cached graph per scale shape (and per batch size): VAR's 10 scales pass dynamo's default limit
        # of 8, past which the remaining scales would silently run eagerly
        limit = max(64, 4 * len(self.schedule))
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
        for block in self.blocks:
            block.compile(**kwargs)
        return self

    def num_parameters(self) -> int:
        """Number of parameters (buffers excluded)."""
        return sum(p.numel() for p in self.parameters())
