"""Residual multi-scale finite scalar quantization (FSQ), and the projected-code base it shares
with the bitwise quantizer.

Codes without a codebook: scale k projects its restricted residual to ``d`` numbers, rounds
each to a fixed grid, and projects back::

    u_k   = proj_in(z_k) / g_k                              # (N, d), g_k a learned per-scale gain
    q_k   = round every u_k[:, i] to the nearest of levels[i] values in [-1, 1]
    idx_k = mixed-radix code of the level digits             # in [0, prod(levels))
    h_k   = g_k * proj_out(q_k)                              # (N, C): the code of scale k

The residual loop around it (pyramid, phi, teacher forcing, decode state, loss) is
:class:`~msar.quantizer.ResidualQuantizer`'s, exactly as for VQ.  The gains let later scales,
whose residuals are smaller, keep the whole grid.  ``proj_in`` starts with orthonormal rows
and ``proj_out`` as its transpose, so an untrained quantizer picks the code nearest to the
residual in latent space (the grid is a product, so rounding each coordinate is the nearest
point); training moves ``proj_in`` by the straight-through estimator of the rounding.
With odd levels the grid contains 0, so a scale can always "add nothing".
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from .pyramid import LatentPyramid
from .quantizer import ResidualQuantizer, from_tokens
from .schedule import ScaleSchedule


def default_levels(vocab_size: int) -> tuple[int, ...]:
    """FSQ levels whose product is ``vocab_size = 2^b``: groups of 3 bits (8 levels), the
    remainder as one 4- or 2-level dimension, e.g. ``4096 -> (8, 8, 8, 8)``, ``1024 -> (8, 8, 8, 2)``."""
    if vocab_size < 2 or vocab_size & (vocab_size - 1):
        raise ValueError(f"default FSQ levels need a vocab_size that is a power of 2, got {vocab_size}; pass levels")
    b = vocab_size.bit_length() - 1
    return (8,) * (b // 3) + ((2 ** (b % 3),) if b % 3 else ())


class ProjectedQuantizer(ResidualQuantizer):
    """Codes ``g_k * proj_out(values(idx))`` with ``values`` a fixed map ``idx -> (d,)``.

    A subclass defines :meth:`index_to_values` ``(...,) long -> (..., d)``, :meth:`quantize`
    ``u (N, d) -> (N,) long`` (the nearest code, in ``u`` space) and :meth:`bound` (what the
    straight-through estimator differentiates: the continuous point the code replaces).

    Args:
        vocab_size: V, the number of codes.
        dim: latent channels C.
        code_dim: d, numbers per code.
        pyramid, share_phi, phi_ratio, phi_kernel, beta, num_phi, phi_neighbourhood: as for
            :class:`~msar.quantizer.MultiScaleResidualQuantizer`.
    """

    def __init__(self, vocab_size: int, dim: int, code_dim: int, pyramid: LatentPyramid | ScaleSchedule | Sequence,
                 share_phi: int = 4, phi_ratio: float = 0.5, phi_kernel: int | tuple[int, ...] | None = None,
                 beta: float = 0.25, num_phi: int | None = None, phi_neighbourhood: torch.Tensor | None = None):
        super().__init__(vocab_size, dim, pyramid, share_phi=share_phi, phi_ratio=phi_ratio, phi_kernel=phi_kernel,
                         beta=beta, num_phi=num_phi, phi_neighbourhood=phi_neighbourhood)
        self.code_dim = int(code_dim)
        self.proj_in = nn.Linear(self.dim, self.code_dim, bias=False)
        self.proj_out = nn.Linear(self.code_dim, self.dim, bias=False)
        with torch.no_grad():
            nn.init.orthogonal_(self.proj_in.weight)
            self.proj_out.weight.copy_(self.proj_in.weight.T)
        self.log_gain = nn.Parameter(torch.zeros(len(self.schedule)))

    # ------------------------------------------------------------------ the code map of a subclass
    def index_to_values(self, idx: torch.Tensor) -> torch.Tensor:
        """``(...,)`` long -> ``(..., d)`` code values."""
        raise NotImplementedError

    def quantize(self, u: torch.Tensor) -> torch.Tensor:
        """``u (N, d)`` -> ``(N,)`` long: the index of the nearest code."""
        raise NotImplementedError

    def bound(self, u: torch.Tensor) -> torch.Tensor:
        """``u (N, d)`` -> the continuous point ``(N, d)`` the code stands for (for the straight-through gradient)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ ResidualQuantizer
    @property
    def code_weight(self) -> torch.Tensor:
        return self.proj_out.weight

    def gain(self, k: int) -> torch.Tensor:
        """Scale k's gain ``g_k`` (0-dim)."""
        return self.log_gain[k].exp()

    def encode_tokens(self, z: torch.Tensor, k: int) -> torch.Tensor:
        return self.quantize(self.proj_in(z) / self.gain(k))

    def _codes(self, values: torch.Tensor, k: int) -> torch.Tensor:
        """``(B, n_k, d)`` values -> ``(B, C, *shape_k)`` code map."""
        return from_tokens(self.proj_out(values.to(self.code_weight.dtype)) * self.gain(k), self.schedule.shape(k))

    def lookup(self, idx: torch.Tensor, k: int) -> torch.Tensor:
        return self._codes(self.index_to_values(idx), k)

    def embed_probs(self, probs: torch.Tensor, k: int) -> torch.Tensor:
        """Expected code under ``probs`` ``(B, n_k, V)``: codes are linear in the values, so this is
        the code of the expected values ``probs @ values(arange(V))``."""
        table = self.index_to_values(torch.arange(self.vocab_size, device=probs.device)).to(probs.dtype)
        return self._codes(probs @ table, k)

    def code_map(self, z: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
        """The code of ``idx`` with the gradient of :meth:`bound` (straight-through), which trains
        ``proj_in`` and the gain; ``z`` ``(B n_k, C)``, ``idx`` ``(B, n_k)``."""
        u = self.bound(self.proj_in(z) / self.gain(k))
        q = self.index_to_values(idx.reshape(-1)).to(u.dtype)
        return self._codes((u + (q - u).detach()).view(*idx.shape, self.code_dim), k)


class FSQQuantizer(ProjectedQuantizer):
    """Residual multi-scale FSQ: ``levels[i]`` evenly spaced values in ``[-1, 1]`` per code dimension.

    Token index = mixed-radix code of the digits (the first dimension least significant), so
    ``V = prod(levels)``.  See the module docstring for the algorithm.

    Args:
        levels: grid sizes per code dimension, each >= 2 (odd sizes contain 0); e.g.
            ``(8, 8, 8, 8)`` for 12 bits per token, or FSQ's ``(7, 5, 5, 5, 5)`` (~12.1 bits).
        dim, pyramid and the rest: as for :class:`ProjectedQuantizer`.

    Usage state as VQ's: ``usage_ema`` ``(K, V)``.
    """

    def __init__(self, levels: Sequence[int], dim: int, pyramid: LatentPyramid | ScaleSchedule | Sequence, **kw):
        levels = tuple(int(v) for v in levels)
        if not levels or min(levels) < 2:
            raise ValueError(f"FSQ levels: expected a non-empty list of grid sizes >= 2, got {levels}")
        super().__init__(math.prod(levels), dim, len(levels), pyramid, **kw)
        self.levels = levels
        self.register_buffer("_levels", torch.tensor(levels), persistent=False)
        self.register_buffer("_basis", torch.tensor([math.prod(levels[:i]) for i in range(len(levels))]),
                             persistent=False)
        self._init_usage((self.vocab_size,))

    def index_to_values(self, idx: torch.Tensor) -> torch.Tensor:
        digits = (idx.unsqueeze(-1) // self._basis) % self._levels
        return digits.float() * (2.0 / (self._levels - 1)) - 1.0

    def bound(self, u: torch.Tensor) -> torch.Tensor:
        return u.clamp(-1.0, 1.0)

    def quantize(self, u: torch.Tensor) -> torch.Tensor:
        steps = (self._levels - 1).to(u.dtype)
        digits = torch.round((self.bound(u) + 1.0) * (steps / 2)).long()
        return (digits * self._basis).sum(-1)
