"""Multi-scale residual vector quantization (VAR's tokenizer core), for any pyramid.

Scale k quantizes what scales < k left unexplained::

    f_rest = f;  f_hat = 0
    for k in 0..K-1:
        z_k   = restrict(f_rest, k)                 # (B, C, *shape_k)
        idx_k = nearest codeword of every token of z_k
        h_k   = phi_k(prolong(embed(idx_k), k))     # back at full resolution
        f_hat += h_k;  f_rest -= h_k

One codebook is shared by all scales; ``phi_k`` is VAR's light convolution that
repairs the blur of prolongation (``h <- (1 - r) h + r conv(h)``), chosen by VAR's
tick rule from a bank of 0 (none), 1 (shared), n (partially shared) or K (one per
scale) convolutions.  Only the pyramid (restriction / prolongation) depends on
the modality; everything here works on ``(B, C, *shape)`` latents of any rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .pyramid import GridPyramid, LatentPyramid
from .schedule import ScaleSchedule

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Phi(nn.Module):
    """``h -> (1 - ratio) * h + ratio * conv(h)``, a residual refinement conv of any rank."""

    def __init__(self, dim: int, ratio: float, rank: int, kernel_size: int | tuple[int, ...] = 3):
        super().__init__()
        # a tuple kernel (e.g. (1, 3, 3) for per-frame video pyramids) keeps phi from mixing along an axis
        padding = tuple(k // 2 for k in kernel_size) if isinstance(kernel_size, (tuple, list)) else kernel_size // 2
        self.conv = _CONV[rank](dim, dim, kernel_size=kernel_size, stride=1, padding=padding)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + self.conv(h).mul_(self.ratio)


class PhiBank(nn.Module):
    """The set of phi convolutions and VAR's rule for which one serves scale k.

    ``share``: 0 = one per scale (``num`` of them, default K), 1 = one shared by
    all scales, n > 1 = n partially shared.  ``ratio == 0`` disables phi entirely.
    For n convs VAR places ticks at ``linspace(1/3n, 1 - 1/3n, n)`` when n == 4 and
    ``linspace(1/2n, 1 - 1/2n, n)`` otherwise; scale k of K uses the conv whose
    tick is nearest to ``k / (K - 1)``.
    """

    def __init__(self, dim: int, num_scales: int, share: int = 4, ratio: float = 0.5, rank: int = 2,
                 kernel_size: int | tuple[int, ...] = 3, num: int | None = None):
        super().__init__()
        if share < 0:
            raise ValueError(f"phi share must be >= 0 (0 = one per scale, 1 = shared, n = partially shared), got {share}")
        self.num_scales = num_scales
        self.enabled = abs(ratio) > 1e-6
        n = (num or num_scales) if share == 0 else share
        self.share = share
        self.convs = nn.ModuleList([Phi(dim, ratio, rank, kernel_size) for _ in range(n)] if self.enabled else [])
        self.ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)

    def index(self, k: int) -> int:
        """Which conv serves scale k (of ``num_scales``)."""
        if self.share == 1:
            return 0
        at = k / (self.num_scales - 1) if self.num_scales > 1 else 0.0
        return int(np.argmin(np.abs(self.ticks - at)).item())

    def forward(self, h: torch.Tensor, k: int) -> torch.Tensor:
        if not self.enabled:
            return h
        return self.convs[self.index(k)](h)


@dataclass
class QuantizerOutput:
    """Result of the training forward of :class:`MultiScaleResidualQuantizer`.

    f_hat: ``(B, C, *full)`` quantized latent with straight-through gradient to the input.
    indices: per scale ``(B, n_k)`` long.
    loss: scalar, VAR's commitment + codebook loss averaged over scales.
    usage: per scale, percentage of the vocabulary hit at least ``margin`` times (EMA).
    """

    f_hat: torch.Tensor
    indices: list[torch.Tensor]
    loss: torch.Tensor
    usage: list[float]


def to_tokens(h: torch.Tensor) -> torch.Tensor:
    """``(B, C, *shape) -> (B, n, C)``, row-major over ``shape``."""
    return h.flatten(2).transpose(1, 2)


def from_tokens(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(B, n, C) -> (B, C, *shape)``."""
    B, n, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *shape)


class MultiScaleResidualQuantizer(nn.Module):
    """One codebook, K scales, residual quantization through a :class:`LatentPyramid`.

    Args:
        vocab_size: number of codewords V.
        dim: latent channels C.
        pyramid: restriction/prolongation of the modality; a schedule or list of grid
            shapes builds a :class:`GridPyramid`. Methods accept ``pyramid=`` to use
            per-batch operators (e.g. graphs) with the same codebook.
        share_phi: 0 = one phi per scale, 1 = one shared, n = n partially shared.
        phi_ratio: r in ``(1 - r) h + r conv(h)``; 0 disables phi.
        phi_kernel: kernel size of phi (an int or a per-axis tuple); default 3 on grids, 1 on
            token-count scales.
        beta: commitment weight.
        l2_norm: nearest codeword by cosine similarity (VAR's ``using_znorm``).
        num_phi: number of phi convs when ``share_phi == 0`` (default: number of scales).
    """

    def __init__(self, vocab_size: int, dim: int, pyramid: LatentPyramid | ScaleSchedule | Sequence,
                 share_phi: int = 4, phi_ratio: float = 0.5, phi_kernel: int | tuple[int, ...] | None = None,
                 beta: float = 0.25, l2_norm: bool = False, num_phi: int | None = None):
        super().__init__()
        if not isinstance(pyramid, LatentPyramid):
            pyramid = GridPyramid(pyramid)
        self.pyramid = pyramid
        self.schedule: ScaleSchedule = pyramid.schedule
        self.vocab_size, self.dim = int(vocab_size), int(dim)
        self.beta, self.l2_norm = beta, l2_norm
        # phi is a conv over the grid; on token-count scales (no neighbourhood) it is pointwise
        all_grid = all(self.schedule.is_grid(k) for k in range(len(self.schedule)))
        rank = self.schedule.rank if all_grid else 1
        if phi_kernel is None:
            phi_kernel = 3 if all_grid else 1
        self.phi = PhiBank(dim, len(self.schedule), share=share_phi, ratio=phi_ratio, rank=rank,
                           kernel_size=phi_kernel, num=num_phi)
        self.embedding = nn.Embedding(self.vocab_size, self.dim)
        # EMA of codeword hits per scale, for usage statistics and dead-code restarts.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.schedule), self.vocab_size))
        self.record_hit = 0

    # ------------------------------------------------------------------ helpers
    def _pyr(self, pyramid: Optional[LatentPyramid]) -> LatentPyramid:
        return self.pyramid if pyramid is None else pyramid

    @staticmethod
    def full_shape(pyr: LatentPyramid) -> tuple[int, ...]:
        """Shape of the full-resolution latent: ``pyr.full`` when the pyramid defines it (it
        may differ from the last scale's grid, e.g. per-frame video pyramids), else the last scale."""
        full = getattr(pyr, "full", None)
        return tuple(full) if full is not None else tuple(pyr.schedule.shape(-1))

    def _check_latent(self, f: torch.Tensor, pyr: LatentPyramid) -> None:
        full = self.full_shape(pyr)
        if not isinstance(f, torch.Tensor) or not f.dtype.is_floating_point:
            raise TypeError(f"expected a floating-point latent tensor, got {type(f).__name__} {getattr(f, 'dtype', '')}")
        if f.dim() != 2 + len(full) or f.shape[1] != self.dim or tuple(f.shape[2:]) != tuple(full):
            raise ValueError(
                f"expected a latent of shape (B, {self.dim}, {', '.join(map(str, full))}), got {tuple(f.shape)}"
            )
        if f.shape[0] == 0:
            raise ValueError(f"expected a latent batch of at least one sample, got shape {tuple(f.shape)}")

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codeword for every row of ``z`` ``(N, C)`` -> ``(N,)``."""
        E = self.embedding.weight.data
        if self.l2_norm:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(E.T, dim=0), dim=1)
        # ||z||^2 + ||e||^2 - 2 z.e, in VAR's exact order of operations (ties break identically)
        d = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(E.square(), dim=1, keepdim=False)
        d.addmm_(z, E.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=1)

    def lookup(self, idx: torch.Tensor, k: int, pyramid: Optional[LatentPyramid] = None) -> torch.Tensor:
        """Codewords of scale k: ``(B, n_k)`` long -> ``(B, C, *shape_k)``."""
        shape = self._pyr(pyramid).schedule.shape(k)
        return from_tokens(self.embedding(idx), shape)

    def embed_probs(self, probs: torch.Tensor, k: int, pyramid: Optional[LatentPyramid] = None) -> torch.Tensor:
        """Soft codewords (for Gumbel smoothing): ``(B, n_k, V)`` probabilities -> ``(B, C, *shape_k)``."""
        shape = self._pyr(pyramid).schedule.shape(k)
        return from_tokens(probs @ self.embedding.weight.unsqueeze(0), shape)

    def upsample(self, h_k: torch.Tensor, k: int, pyramid: Optional[LatentPyramid] = None) -> torch.Tensor:
        """``phi_k(prolong(h_k))``: a scale-k code map's contribution to the full latent."""
        return self.phi(self._pyr(pyramid).prolong(h_k, k), k)

    # ------------------------------------------------------------------ encoding
    @torch.no_grad()
    def encode(self, f: torch.Tensor, pyramid: Optional[LatentPyramid] = None,
               return_fhat: bool = False) -> list[torch.Tensor]:
        """Tokenize a latent: ``(B, C, *full)`` -> per scale ``(B, n_k)`` long.

        With ``return_fhat=True`` returns the cumulative quantized latents
        ``(B, C, *full)`` after each scale instead.
        """
        pyr = self._pyr(pyramid)
        self._check_latent(f, pyr)
        w = self.embedding.weight
        if f.dtype != w.dtype and not torch.is_autocast_enabled(f.device.type):
            raise TypeError(f"latent dtype {f.dtype} differs from the codebook's {w.dtype} "
                            f"(convert with .to({w.dtype}) or run under torch.autocast)")
        B, C = f.shape[:2]
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out: list[torch.Tensor] = []
        for k in range(len(pyr.schedule)):
            z = to_tokens(pyr.restrict(f_rest, k)).reshape(-1, C)
            idx = self.nearest(z).view(B, -1)
            h = self.upsample(self.lookup(idx, k, pyr).contiguous(), k, pyr)
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(f_hat.clone() if return_fhat else idx)
        return out

    def indices_to_fhat(self, indices: Sequence[torch.Tensor], pyramid: Optional[LatentPyramid] = None,
                        cumulative: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Sum the per-scale contributions of token indices: the final ``(B, C, *full)``
        latent, or the list after each scale with ``cumulative=True``."""
        pyr = self._pyr(pyramid)
        B = pyr.schedule.check_indices(indices, self.vocab_size)
        f_hat = self.embedding.weight.new_zeros(B, self.dim, *self.full_shape(pyr))
        steps = []
        for k, idx in enumerate(indices):
            f_hat = f_hat + self.upsample(self.lookup(idx, k, pyr), k, pyr)
            steps.append(f_hat)
        return steps if cumulative else f_hat

    def teacher_forcing_input(self, indices: Sequence[torch.Tensor],
                              pyramid: Optional[LatentPyramid] = None) -> torch.Tensor:
        """Transformer inputs for scales 1..K-1 from ground-truth tokens: ``(B, L - n_0, C)``.

        The input of scale k+1 is the latent accumulated over scales <= k, resampled
        to scale k+1 -- exactly what :meth:`add_scale` produces at inference.
        """
        pyr = self._pyr(pyramid)
        sched = pyr.schedule
        B = sched.check_indices(indices, self.vocab_size)
        f_hat = self.embedding.weight.new_zeros(B, self.dim, *self.full_shape(pyr))
        nexts = []
        for k in range(len(sched) - 1):
            f_hat.add_(self.upsample(self.lookup(indices[k], k, pyr), k, pyr))
            nexts.append(to_tokens(pyr.resample(f_hat, k + 1)).clone())
        if not nexts:
            return f_hat.new_zeros(B, 0, self.dim)
        return torch.cat(nexts, dim=1)

    def add_scale(self, f_hat: torch.Tensor, k: int, h_k: torch.Tensor,
                  pyramid: Optional[LatentPyramid] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Inference step: add scale k's code map ``h_k`` ``(B, C, *shape_k)`` to ``f_hat``
        (in place) and return ``(f_hat, next_input)`` with ``next_input`` the
        ``(B, n_{k+1}, C)`` transformer input of scale k+1 (``None`` after the last scale).
        """
        pyr = self._pyr(pyramid)
        f_hat.add_(self.upsample(h_k, k, pyr))
        if k == len(pyr.schedule) - 1:
            return f_hat, None
        # clone: at the finest scale resample may return a view of f_hat, which later scales mutate
        return f_hat, to_tokens(pyr.resample(f_hat, k + 1)).clone()

    # ------------------------------------------------------------------ training
    def forward(self, f: torch.Tensor, pyramid: Optional[LatentPyramid] = None) -> QuantizerOutput:
        """Training forward: quantize with gradients to codebook and phi, straight-through
        to the encoder, VAR's loss ``mean_k [beta ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2]``."""
        pyr = self._pyr(pyramid)
        self._check_latent(f, pyr)
        dtype = f.dtype
        f = f.float()
        B, C = f.shape[:2]
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        K = len(pyr.schedule)
        loss = f.new_zeros(())
        indices = []
        for k in range(K):
            z = to_tokens(pyr.restrict(f_rest, k)).reshape(-1, C)
            idx = self.nearest(z)
            hits = idx.bincount(minlength=self.vocab_size).float()
            if torch.distributed.is_available() and torch.distributed.is_initialized() and self.training:
                torch.distributed.all_reduce(hits)
            if self.training:
                self._record_hits(k, hits)
            idx = idx.view(B, -1)
            indices.append(idx)
            h = self.upsample(self.lookup(idx, k, pyr).contiguous(), k, pyr)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + F.mse_loss(f_hat.detach(), f).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
        loss = loss / K
        f_hat_st = (f_hat.detach() - f_no_grad) + f  # straight-through: value of f_hat, gradient of f
        # (the codebook and phi learn through `loss`; the encoder through the straight-through path)
        return QuantizerOutput(f_hat_st.to(dtype), indices, loss, self.usage(B * int(np.prod(self.full_shape(pyr)))))

    @torch.no_grad()
    def _record_hits(self, k: int, hits: torch.Tensor) -> None:
        ema = self.ema_vocab_hit_SV[k]
        if self.record_hit == 0:
            ema.copy_(hits)
        elif self.record_hit < 100:
            ema.mul_(0.9).add_(hits.mul(0.1))
        else:
            ema.mul_(0.99).add_(hits.mul(0.01))
        if k == len(self.schedule) - 1:
            self.record_hit += 1

    def usage(self, tokens_per_step: int | None = None) -> list[float]:
        """Per scale, % of codewords whose EMA hit count is above VAR's margin
        (8% of a uniform share of ``tokens_per_step``)."""
        if tokens_per_step is None:
            tokens_per_step = int(self.ema_vocab_hit_SV[-1].sum().item()) or 1
        margin = tokens_per_step / self.vocab_size * 0.08
        return [(row >= margin).float().mean().item() * 100 for row in self.ema_vocab_hit_SV]

    @torch.no_grad()
    def restart_dead_codes(self, f: torch.Tensor, threshold: float = 1e-3,
                           generator: torch.Generator | None = None) -> int:
        """Re-seed codewords whose EMA hits (summed over scales) fall below ``threshold``
        with random latent vectors from ``f`` ``(B, C, *full)``; returns how many."""
        dead = self.ema_vocab_hit_SV.sum(0) < threshold
        n_dead = int(dead.sum())
        if n_dead == 0 or self.record_hit == 0:
            return 0
        pool = to_tokens(f.detach().float()).reshape(-1, self.dim)
        pick = torch.randint(0, pool.shape[0], (n_dead,), generator=generator, device=pool.device)
        self.embedding.weight.data[dead] = pool[pick].to(self.embedding.weight.dtype)
        self.ema_vocab_hit_SV[:, dead] = threshold  # give them a grace period
        return n_dead
