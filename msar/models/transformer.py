"""The next-scale prediction transformer (VAR), for any scale schedule.

GPT-2 style pre-norm blocks whose LayerNorms are modulated by the condition
(AdaLN: per-block or one projection shared by all blocks), optional cosine
attention with a learned per-head temperature (VAR's ``attn_l2_norm``),
stochastic depth, and a class embedding that is both the start token and the
condition (row ``num_classes`` is the null class used for classifier-free
guidance).  Training runs all scales at once under the block-causal mask;
inference runs one scale at a time against a preallocated KV cache.

Parameter names follow the reference VAR implementation so released
checkpoints load without renaming.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..pretrained import PretrainedMixin
from ..schedule import ScaleSchedule


# ---------------------------------------------------------------------------- building blocks
class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
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
        n = k.shape[2]
        end = self.length + n
        if end > self.k.shape[2]:
            raise RuntimeError(f"KV cache overflow: {end} > {self.k.shape[2]} positions")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``.

    Fused QKV projection with a bias on q and v only (k's bias is a zero buffer, as
    in VAR).  With ``l2_norm`` q and k are unit-normalized and q is multiplied by a
    learned per-head scale ``exp(min(s, log 100))``; otherwise the logit scale is
    VAR's ``0.25 / sqrt(head_dim)``.
    """

    def __init__(self, dim: int, heads: int, l2_norm: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.l2_norm = l2_norm
        if l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """x: ``(B, L, C)``; attn_mask: bool ``(L, L)`` (True = may attend) or additive."""
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        if self.l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


class FFN(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class SharedAdaLin(nn.Linear):
    """One AdaLN projection for all blocks: ``(B, D) -> (B, 1, 6, C)``."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
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
    shift1, shift2``:  ``x += gamma1 * attn(LN(x) * (1 + scale1) + shift1)`` and the
    same for the MLP.  With ``shared_aln`` the block holds a learned offset
    ``ada_gss (1, 1, 6, C)`` added to the shared projection.
    """

    def __init__(self, dim: int, cond_dim: int, heads: int, mlp_ratio: float = 4.0, shared_aln: bool = False,
                 l2_norm: bool = False, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-6):
        super().__init__()
        self.C = dim
        self.shared_aln = shared_aln
        self.attn = SelfAttention(dim, heads, l2_norm=l2_norm, attn_drop=attn_drop, proj_drop=drop)
        self.ffn = FFN(dim, round(dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, dim) / dim ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.shared_aln:
            return (self.ada_gss + cond).unbind(2)  # cond is (B, 1, 6, C) from the shared projection
        return self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, mod: Optional[tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        # mod: this block's modulation precomputed by the sampler (it depends on the class only,
        # so computing it once per generation saves depth x K matmuls)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond) if mod is None else mod
        h = self.attn(_modulate(self.ln_wo_grad(x), scale1, shift1), attn_mask=attn_mask, cache=cache)
        x = x + self.drop_path(h.mul_(gamma1))
        h = self.ffn(_modulate(self.ln_wo_grad(x), scale2, shift2))
        return x + self.drop_path(h.mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    """Final AdaLN (scale and shift only) before the output projection."""

    def __init__(self, dim: int, cond_dim: int, norm_eps: float = 1e-6):
        super().__init__()
        self.C = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return _modulate(self.ln_wo_grad(x), scale, shift)


# ---------------------------------------------------------------------------- the model
@dataclass
class TransformerConfig:
    """Hyper-parameters of :class:`NextScaleTransformer`.

    ``schedule`` is a list of scales (see :class:`ScaleSchedule`); ``latent_dim`` is
    the tokenizer's codeword size (VAR's Cvae); ``num_classes = 0`` gives an
    unconditional model (only the null class).
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

    @classmethod
    def var(cls, depth: int, schedule: list, vocab_size: int = 4096, latent_dim: int = 32,
            num_classes: int = 1000, shared_aln: bool = False, **kw) -> "TransformerConfig":
        """VAR's recipe: width 64 x depth, heads = depth, cosine attention, drop-path 0.1 x depth / 24."""
        return cls(schedule=schedule, vocab_size=vocab_size, latent_dim=latent_dim, num_classes=num_classes,
                   depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
                   shared_aln=shared_aln, attn_l2_norm=True, **kw)


class NextScaleTransformer(PretrainedMixin, nn.Module):
    """VAR's transformer over a :class:`ScaleSchedule`.

    ``forward(labels (B,), x (B, L - n_0, Cvae)) -> logits (B, L, V)``: teacher forcing
    under the block-causal mask.  ``step`` runs one scale against KV caches.
    A raster (next-token) model is the same class with ``ScaleSchedule.raster(N)``.
    """

    config_class = TransformerConfig  # save_pretrained / from_pretrained

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = self.config = cfg
        # a ScaleSchedule keeps its type (a subclass such as a per-frame video schedule)
        self.schedule = cfg.schedule if isinstance(cfg.schedule, ScaleSchedule) else ScaleSchedule(cfg.schedule)
        s = self.schedule
        self.V, self.Cvae, self.C = cfg.vocab_size, cfg.latent_dim, cfg.embed_dim
        self.num_classes = cfg.num_classes
        self.depth, self.num_heads = cfg.depth, cfg.num_heads
        self.L, self.first_l = s.L, s.first_len
        self.cond_drop_rate = cfg.cond_drop_rate
        init_std = math.sqrt(1 / self.C / 3)

        self.word_embed = nn.Linear(self.Cvae, self.C)
        self.class_emb = nn.Embedding(self.num_classes + 1, self.C)  # last row: null class
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, self.C))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, self.C))
        self.lvl_embed = nn.Embedding(len(s), self.C)
        for t in (self.class_emb.weight, self.pos_start, self.pos_1LC, self.lvl_embed.weight):
            nn.init.trunc_normal_(t.data, mean=0, std=init_std)

        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(self.C, 6 * self.C))
                               if cfg.shared_aln else nn.Identity())
        # linearly increasing stochastic depth (plain Python so the model can be built on the meta device)
        dpr = [cfg.drop_path_rate * i / (cfg.depth - 1) if cfg.depth > 1 else 0.0 for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([
            AdaLNBlock(self.C, self.C, cfg.num_heads, cfg.mlp_ratio, cfg.shared_aln, cfg.attn_l2_norm,
                       cfg.drop_rate, cfg.attn_drop_rate, dpr[i], cfg.norm_eps)
            for i in range(cfg.depth)
        ])
        self.head_nm = AdaLNBeforeHead(self.C, self.C, cfg.norm_eps)
        self.head = nn.Linear(self.C, self.V)

        self.register_buffer("lvl_1L", s.level_ids().view(1, self.L), persistent=False)
        self.register_buffer("attn_mask", s.attn_mask("bool"), persistent=False)

    # ------------------------------------------------------------------ init (VAR's recipe)
    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = 0.02) -> "NextScaleTransformer":
        """VAR's initialisation; ``init_std < 0`` means ``sqrt(1 / 3C)``. Small AdaLN gates
        (``init_adaln_gamma``) start every block close to the identity."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=init_std)
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for b in self.blocks:
            b.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            b.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            if b.shared_aln:
                b.ada_gss[:, :, 2:].mul_(init_adaln)
                b.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                w = b.ada_lin[-1].weight
                w[2 * self.C:].mul_(init_adaln)
                w[:2 * self.C].mul_(init_adaln_gamma)
                b.ada_lin[-1].bias.zero_()
        return self

    # ------------------------------------------------------------------ validation
    def check_labels(self, labels: torch.Tensor, allow_null: bool = True) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor):
            labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"labels: expected a 1-D integer tensor (B,), got shape {tuple(labels.shape)} dtype {labels.dtype}")
        hi = self.num_classes if allow_null else self.num_classes - 1
        compiling = hasattr(torch, "compiler") and torch.compiler.is_compiling()
        if labels.numel() and not compiling and (int(labels.min()) < 0 or int(labels.max()) > hi):
            raise ValueError(
                f"labels: class label out of range [0, {self.num_classes}) (null class {self.num_classes}); "
                f"got min {int(labels.min())}, max {int(labels.max())}"
            )
        return labels.long()

    def _check_input(self, x: torch.Tensor, B: int) -> None:
        want = (B, self.L - self.first_l, self.Cvae)
        if x.dim() != 3 or tuple(x.shape) != want:
            raise ValueError(f"teacher-forcing input: expected shape {want} (B, L - first_l, Cvae), got {tuple(x.shape)}")

    # ------------------------------------------------------------------ pieces shared by training and inference
    def condition(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B,)`` labels -> (class embedding ``(B, C)``, block condition)."""
        cond = self.class_emb(labels)
        return cond, self.shared_ada_lin(cond)

    def level_pos(self) -> torch.Tensor:
        """``(1, L, C)`` level + position embedding."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def logits(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h.float(), cond).float()).float()

    # ------------------------------------------------------------------ training forward
    def forward(self, labels: torch.Tensor, x: torch.Tensor, extra_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced logits.

        Args:
            labels: ``(B,)`` class labels in ``[0, num_classes]`` (``num_classes`` = null);
                during training a fraction ``cond_drop_rate`` is replaced by the null class.
            x: ``(B, L - n_0, Cvae)`` teacher-forcing input from the tokenizer.
            extra_pos: optional ``(B or 1, L, C)`` positions supplied by the adapter.
        Returns:
            ``(B, L, V)`` logits.
        """
        B = x.shape[0]
        labels = self.check_labels(labels)
        if labels.shape[0] != B:
            raise ValueError(f"labels has batch size {labels.shape[0]} but the input has batch size {B}")
        self._check_input(x, B)
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(B, device=labels.device) < self.cond_drop_rate
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        cond, cond_blocks = self.condition(labels)
        sos = cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
        h = torch.cat((sos, self.word_embed(x.float())), dim=1)
        h = h + self.level_pos()
        if extra_pos is not None:
            h = h + extra_pos
        mask = self.attn_mask
        for b in self.blocks:
            h = b(h, cond_blocks, attn_mask=mask)
        return self.logits(h, cond)

    # ------------------------------------------------------------------ incremental inference
    def new_caches(self, batch: int, device=None, dtype=None) -> list[KVCache]:
        p = self.pos_1LC
        return [KVCache(batch, self.num_heads, self.L, self.C // self.num_heads, device or p.device, dtype or p.dtype)
                for _ in range(self.depth)]

    def embed_start(self, cond: torch.Tensor, lvl_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input of scale 0: start token(s) ``(B, n_0, C)``."""
        lvl_pos = self.level_pos() if lvl_pos is None else lvl_pos
        B = cond.shape[0]
        return (cond.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
                + lvl_pos[:, :self.first_l])

    def embed_scale(self, x: torch.Tensor, k: int, lvl_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Input of scale k >= 1 from the tokenizer's ``(B, n_k, Cvae)`` -> ``(B, n_k, C)``."""
        lvl_pos = self.level_pos() if lvl_pos is None else lvl_pos
        return self.word_embed(x) + lvl_pos[:, self.schedule.slice(k)]

    def modulations(self, cond_blocks: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per block, its six AdaLN vectors for this condition (constant over the scales)."""
        return [b.modulation(cond_blocks) for b in self.blocks]

    def step(self, h: torch.Tensor, cond: torch.Tensor, cond_blocks: torch.Tensor,
             caches: Sequence[KVCache], mods: Optional[Sequence[tuple[torch.Tensor, ...]]] = None,
             head_rows: Optional[int] = None) -> torch.Tensor:
        """Run the tokens of one scale ``(B, n_k, C)`` through all blocks, extending the
        KV caches; returns ``(B, n_k, V)`` logits. No mask is needed: a scale sees
        everything cached so far and all of itself. ``mods``: precomputed
        :meth:`modulations`; ``head_rows``: only the first rows need logits (the
        unconditional half when its guidance weight is 0 needs only its KV cache)."""
        mods = mods if mods is not None else [None] * len(self.blocks)
        for b, c, m in zip(self.blocks, caches, mods):
            h = b(h, cond_blocks, attn_mask=None, cache=c, mod=m)
        if head_rows is not None:
            h, cond = h[:head_rows], cond[:head_rows]
        return self.logits(h, cond)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
