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

The loop is :class:`ResidualQuantizer`'s; how a token is coded is its subclass's: a VQ
codebook (:class:`MultiScaleResidualQuantizer`), an FSQ grid (:mod:`msar.fsq`) or sign bits
(:mod:`msar.bitwise`), built by name with :func:`make_quantizer`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

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


class NeighbourhoodPhi(nn.Module):
    """phi for latents without a grid: ``conv(h) = W_self h + W_nbr (h A^T)``.

    ``A`` ``(N, N)`` is a neighbourhood operator on the full-resolution nodes (e.g. a
    row-normalised adjacency of the finest graph level, or of cells on a sphere), the
    non-grid analogue of a 3x3 stencil: each node mixes its own channels with the
    average of its neighbours'.
    """

    def __init__(self, dim: int, ratio: float, neighbourhood: torch.Tensor):
        super().__init__()
        if neighbourhood.dim() != 2 or neighbourhood.shape[0] != neighbourhood.shape[1]:
            raise ValueError(f"phi neighbourhood: expected a square (N, N) operator, got {tuple(neighbourhood.shape)}")
        if not torch.isfinite(neighbourhood).all():
            raise ValueError("phi neighbourhood: the operator contains NaN or infinite entries")
        self.register_buffer("neighbourhood", neighbourhood.float().clone(), persistent=False)
        self.self_mix = nn.Conv1d(dim, dim, 1)
        self.nbr_mix = nn.Conv1d(dim, dim, 1, bias=False)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != 3 or h.shape[-1] != self.neighbourhood.shape[0]:
            raise ValueError(f"NeighbourhoodPhi: expected (B, C, N={self.neighbourhood.shape[0]}), got {tuple(h.shape)}")
        nbr = h @ self.neighbourhood.to(h.dtype).T
        return h.mul(1 - self.ratio) + (self.self_mix(h) + self.nbr_mix(nbr)).mul_(self.ratio)


class PhiBank(nn.Module):
    """The set of phi convolutions and VAR's rule for which one serves scale k.

    ``share``: 0 = one per place in the pyramid (``num`` of them, default: the distinct
    ``progress`` values, K for a single pyramid), 1 = one shared by
    all scales, n > 1 = n partially shared.  ``ratio == 0`` disables phi entirely.
    For n convs VAR places ticks at ``linspace(1/3n, 1 - 1/3n, n)`` when n == 4 and
    ``linspace(1/2n, 1 - 1/2n, n)`` otherwise; scale k uses the conv whose tick is
    nearest to ``progress[k]``, the scale's place in its pyramid from 0 (coarsest) to 1
    (finest): :meth:`msar.ScaleSchedule.progress`, VAR's ``k / (K - 1)`` by default.  A
    schedule of several pyramids (one per video frame) restarts it with every pyramid, so
    the coarse scales of every frame share the coarse phi and the fine scales the fine
    one, instead of each frame getting one phi for all its scales.  ``neighbourhood``
    ``(N, N)`` makes every phi a :class:`NeighbourhoodPhi` (latents without a grid)
    instead of a convolution.
    """

    def __init__(self, dim: int, num_scales: int, share: int = 4, ratio: float = 0.5, rank: int = 2,
                 kernel_size: int | tuple[int, ...] = 3, num: int | None = None,
                 neighbourhood: torch.Tensor | None = None, progress: Sequence[float] | None = None):
        super().__init__()
        if share < 0:
            raise ValueError(f"phi share must be >= 0 (0 = one per place in the pyramid, 1 = one shared by all "
                             f"scales, n > 1 = n partially shared), got {share}")
        if progress is None:  # VAR's single coarse-to-fine ramp
            progress = [k / (num_scales - 1) if num_scales > 1 else 0.0 for k in range(num_scales)]
        if len(progress) != num_scales or not all(0.0 <= float(p) <= 1.0 for p in progress):
            raise ValueError(f"phi progress: expected {num_scales} values in [0, 1] (each scale's place in its "
                             f"pyramid), got {list(progress)}")
        self.num_scales = num_scales
        self.progress = [float(p) for p in progress]
        self.enabled = abs(ratio) > 1e-6
        # share 0: one per place in the pyramid (K for one pyramid; a frame's scales for per-frame ones)
        n = (num or len(set(self.progress))) if share == 0 else share
        self.share = share

        def make() -> nn.Module:
            if neighbourhood is not None:
                return NeighbourhoodPhi(dim, ratio, neighbourhood)
            return Phi(dim, ratio, rank, kernel_size)

        self.convs = nn.ModuleList([make() for _ in range(n)] if self.enabled else [])
        self.ticks = np.linspace(1 / 3 / n, 1 - 1 / 3 / n, n) if n == 4 else np.linspace(1 / 2 / n, 1 - 1 / 2 / n, n)

    def index(self, k: int) -> int:
        """Which conv serves scale k (of ``num_scales``)."""
        if self.share == 1:
            return 0
        return int(np.argmin(np.abs(self.ticks - self.progress[k])).item())

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
    hits: ``(K, V)`` float, how often each codeword was chosen at each scale in this batch
        (pass it, reduced over ranks when training data-parallel, to
        :meth:`MultiScaleResidualQuantizer.record_usage`).
    """

    f_hat: torch.Tensor
    indices: list[torch.Tensor]
    loss: torch.Tensor
    hits: torch.Tensor


def to_tokens(h: torch.Tensor) -> torch.Tensor:
    """``(B, C, *shape) -> (B, n, C)``, row-major over ``shape``."""
    return h.flatten(2).transpose(1, 2)


def from_tokens(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(B, n, C) -> (B, C, *shape)``."""
    B, n, C = x.shape
    return x.transpose(1, 2).reshape(B, C, *shape)


class ResidualQuantizer(nn.Module):
    """The residual loop over scales (module docstring), shared by every multi-scale quantizer.

    A subclass says how one scale's tokens become indices and back, and nothing else:

    ==================================  ====================================================
    ``encode_tokens(z, k)``             ``(N, C)`` restricted residual of scale k -> ``(N,)`` long
    ``lookup(idx, k)``                  ``(B, n_k)`` long -> code map ``(B, C, *shape_k)``
    ``embed_probs(probs, k)``           ``(B, n_k, V)`` probabilities -> expected code map
    ``code_map(z, idx, k)``             training: the code map with the gradients the subclass
                                        wants (default: ``lookup``, the codebook learns through
                                        the loss)
    ``batch_hits(idx)``                 ``(N,)`` indices -> one batch's usage counts (default
                                        ``(V,)`` codeword counts)
    ``code_weight``                     a parameter whose dtype and device latents take
    ==================================  ====================================================

    Pyramid, phi, encoding, decoding, teacher forcing, the decode step, the training loss
    and the usage EMA live here, so every quantizer behaves identically around its codes.
    The constructor arguments are those of :class:`MultiScaleResidualQuantizer`; a subclass
    calls :meth:`_init_usage` once its own parameters exist.
    """

    def __init__(self, vocab_size: int, dim: int, pyramid: LatentPyramid | ScaleSchedule | Sequence,
                 share_phi: int = 4, phi_ratio: float = 0.5, phi_kernel: int | tuple[int, ...] | None = None,
                 beta: float = 0.25, num_phi: int | None = None, phi_neighbourhood: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(pyramid, LatentPyramid):
            pyramid = GridPyramid(pyramid)
        self.pyramid = pyramid
        self.schedule: ScaleSchedule = pyramid.schedule
        self.full_shape: tuple[int, ...] = tuple(pyramid.full)
        self.vocab_size, self.dim = int(vocab_size), int(dim)
        self.beta = beta
        # phi is a conv over the grid; on token-count scales (no neighbourhood) it is pointwise
        all_grid = all(self.schedule.is_grid(k) for k in range(len(self.schedule)))
        rank = self.schedule.rank if all_grid else 1
        if phi_kernel is None:
            phi_kernel = 3 if all_grid else 1
        if phi_neighbourhood is not None and self.full_shape != (phi_neighbourhood.shape[0],):
            raise ValueError(f"phi_neighbourhood: expected an (N, N) operator with N = {self.full_shape} "
                             f"(the full latent), got {tuple(phi_neighbourhood.shape)}")
        # the phi of scale k follows its place in its own pyramid (ScaleSchedule.progress)
        K = len(self.schedule)
        self.phi = PhiBank(dim, K, share=share_phi, ratio=phi_ratio, rank=rank, kernel_size=phi_kernel,
                           num=num_phi, neighbourhood=phi_neighbourhood,
                           progress=[self.schedule.progress(k) for k in range(K)] if K > 1 else None)

    def _init_usage(self, per_scale: tuple[int, ...]) -> None:
        """Register ``usage_ema`` ``(K, *per_scale)`` and ``usage_steps`` (after the subclass's
        parameters, so the state dict keeps VAR's key order)."""
        self.register_buffer("usage_ema", torch.zeros(len(self.schedule), *per_scale))
        self.register_buffer("usage_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ what a subclass provides
    @property
    def code_weight(self) -> torch.Tensor:
        """A parameter whose dtype and device the latents take (the codebook, a projection)."""
        raise NotImplementedError

    def encode_tokens(self, z: torch.Tensor, k: int) -> torch.Tensor:
        """Token index of every row of scale k's restricted residual ``z`` ``(N, C)`` -> ``(N,)``."""
        raise NotImplementedError

    def lookup(self, idx: torch.Tensor, k: int) -> torch.Tensor:
        """Codes of scale k: ``(B, n_k)`` long -> ``(B, C, *shape_k)``."""
        raise NotImplementedError

    def embed_probs(self, probs: torch.Tensor, k: int) -> torch.Tensor:
        """Soft codes: ``(B, n_k, V)`` probabilities -> ``(B, C, *shape_k)``."""
        raise NotImplementedError

    def code_map(self, z: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
        """Training: scale k's code map ``(B, C, *shape_k)`` for the residual tokens ``z`` ``(B n_k, C)``
        quantized to ``idx`` ``(B, n_k)``."""
        return self.lookup(idx, k)

    def batch_hits(self, idx: torch.Tensor) -> torch.Tensor:
        """One scale's usage counts in a batch from its indices ``(N,)``: ``(V,)`` float."""
        return idx.bincount(minlength=self.vocab_size).float()

    @torch.no_grad()
    def restart_dead_codes(self, f: torch.Tensor, threshold: float = 1e-3,
                           generator: torch.Generator | None = None) -> int:
        """Re-seed unused codes; quantizers without a learned codebook have none (returns 0)."""
        return 0

    # ------------------------------------------------------------------ helpers
    def _check_latent(self, f: torch.Tensor) -> None:
        full = self.full_shape
        if not isinstance(f, torch.Tensor) or not f.dtype.is_floating_point:
            raise TypeError(f"expected a floating-point latent tensor, got {type(f).__name__} {getattr(f, 'dtype', '')}")
        if f.dim() != 2 + len(full) or f.shape[1] != self.dim or tuple(f.shape[2:]) != tuple(full):
            raise ValueError(
                f"expected a latent of shape (B, {self.dim}, {', '.join(map(str, full))}), got {tuple(f.shape)}"
            )
        if f.shape[0] == 0:
            raise ValueError(f"expected a latent batch of at least one sample, got shape {tuple(f.shape)}")

    def upsample(self, h_k: torch.Tensor, k: int) -> torch.Tensor:
        """``phi_k(prolong(h_k))``: a scale-k code map's contribution to the full latent."""
        return self.phi(self.pyramid.prolong(h_k, k), k)

    # ------------------------------------------------------------------ encoding
    def _residual_encode(self, f: torch.Tensor, corrupt: Callable[[torch.Tensor, int], torch.Tensor] | None = None
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(idx_k (B, n_k), f_hat after scale k (B, C, *full))`` for k = 0..K-1 (f_hat is
        updated in place: clone it to keep it).  ``corrupt(idx_k, k)``: the tokens whose codes are
        accumulated instead of ``idx_k`` (see :meth:`encode_with_corruption`)."""
        self._check_latent(f)
        w = self.code_weight
        if f.dtype != w.dtype and not torch.is_autocast_enabled(f.device.type):
            raise TypeError(f"latent dtype {f.dtype} differs from the codebook's {w.dtype} "
                            f"(convert with .to({w.dtype}) or run under torch.autocast)")
        B, C = f.shape[:2]
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        for k in range(len(self.schedule)):
            z = to_tokens(self.pyramid.restrict(f_rest, k)).reshape(-1, C)
            idx = self.encode_tokens(z, k).view(B, -1)
            h = self.upsample(self.lookup(idx if corrupt is None else corrupt(idx, k), k).contiguous(), k)
            f_hat.add_(h)
            f_rest.sub_(h)
            yield idx, f_hat

    @torch.no_grad()
    def encode(self, f: torch.Tensor) -> list[torch.Tensor]:
        """Tokenize a latent: ``(B, C, *full)`` -> per scale ``(B, n_k)`` long."""
        return [idx for idx, _ in self._residual_encode(f)]

    @torch.no_grad()
    def encode_with_corruption(self, f: torch.Tensor, corrupt: Callable[[torch.Tensor, int], torch.Tensor]
                               ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Self-correction data (Infinity): encode ``f`` ``(B, C, *full)``, but accumulate the codes of
        ``corrupt(idx_k, k)`` -- e.g. tokens with flipped bits, the mistakes a sampler makes --
        instead of ``idx_k``, so every later scale quantizes the residual those mistakes leave.

        Returns ``(targets, inputs)``, per scale ``(B, n_k)`` long: the tokens to predict and the
        corrupted tokens, whose :meth:`teacher_forcing_input` is the transformer's input."""
        inputs: list[torch.Tensor] = []

        def recorded(idx: torch.Tensor, k: int) -> torch.Tensor:
            inputs.append(corrupt(idx, k))
            return inputs[-1]

        return [idx for idx, _ in self._residual_encode(f, recorded)], inputs

    @torch.no_grad()
    def encode_progression(self, f: torch.Tensor) -> list[torch.Tensor]:
        """The quantized latent ``(B, C, *full)`` after each scale of encoding ``f``."""
        return [f_hat.clone() for _, f_hat in self._residual_encode(f)]

    def indices_to_fhat_progression(self, indices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The latent ``(B, C, *full)`` accumulated over scales ``<= k``, for every k."""
        B = self.schedule.check_indices(indices, self.vocab_size)
        f_hat = self.code_weight.new_zeros(B, self.dim, *self.full_shape)
        steps = []
        for k, idx in enumerate(indices):
            f_hat = f_hat + self.upsample(self.lookup(idx, k), k)
            steps.append(f_hat)
        return steps

    def indices_to_fhat(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum of the per-scale contributions of token indices: the ``(B, C, *full)`` latent."""
        return self.indices_to_fhat_progression(indices)[-1]

    def teacher_forcing_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Transformer inputs for scales 1..K-1 from ground-truth tokens: ``(B, L - n_0, C)``.

        The input of scale k+1 is the latent accumulated over scales <= k, resampled
        to scale k+1 -- exactly what :meth:`add_scale` produces at inference (it is the
        same loop).
        """
        B = self.schedule.check_indices(indices, self.vocab_size)
        f_hat = self.code_weight.new_zeros(B, self.dim, *self.full_shape)
        nexts = []
        for k in range(len(self.schedule) - 1):
            f_hat, nxt = self.add_scale(f_hat, k, self.lookup(indices[k], k))
            nexts.append(nxt)
        if not nexts:
            return f_hat.new_zeros(B, 0, self.dim)
        return torch.cat(nexts, dim=1)

    def add_scale(self, f_hat: torch.Tensor, k: int, h_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Inference step: add scale k's code map ``h_k`` ``(B, C, *shape_k)`` to ``f_hat``
        (in place) and return ``(f_hat, next_input)`` with ``next_input`` the
        ``(B, n_{k+1}, C)`` transformer input of scale k+1 (``None`` after the last scale).
        """
        f_hat.add_(self.upsample(h_k, k))
        if k == len(self.schedule) - 1:
            return f_hat, None
        # clone: at the finest scale resample may return a view of f_hat, which later scales mutate
        return f_hat, to_tokens(self.pyramid.resample(f_hat, k + 1)).clone()

    # ------------------------------------------------------------------ training
    def forward(self, f: torch.Tensor) -> QuantizerOutput:
        """Training forward: quantize with gradients to codebook and phi, straight-through
        to the encoder, VAR's loss ``mean_k [beta ||sg(f_hat_k) - f||^2 + ||f_hat_k - sg(f)||^2]``.

        Pure: usage statistics are not updated here (the caller passes ``out.hits``,
        reduced over ranks if need be, to :meth:`record_usage`)."""
        self._check_latent(f)
        dtype = f.dtype
        f = f.float()
        B, C = f.shape[:2]
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        K = len(self.schedule)
        loss = f.new_zeros(())
        indices, hits = [], []
        for k in range(K):
            z = to_tokens(self.pyramid.restrict(f_rest, k)).reshape(-1, C)
            idx = self.encode_tokens(z, k)
            hits.append(self.batch_hits(idx))
            idx = idx.view(B, -1)
            indices.append(idx)
            h = self.upsample(self.code_map(z, idx, k).contiguous(), k)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            loss = loss + F.mse_loss(f_hat.detach(), f).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
        loss = loss / K
        f_hat_st = (f_hat.detach() - f_no_grad) + f  # straight-through: value of f_hat, gradient of f
        # (the codebook and phi learn through `loss`; the encoder through the straight-through path)
        return QuantizerOutput(f_hat_st.to(dtype), indices, loss, torch.stack(hits))

    @torch.no_grad()
    def record_usage(self, hits: torch.Tensor) -> None:
        """Fold one batch's hits (``QuantizerOutput.hits``; ``(K, V)`` for codewords) into ``usage_ema``
        (VAR's schedule: copy the first batch, then EMA 0.9 for 100 batches, then 0.99)."""
        if tuple(hits.shape) != tuple(self.usage_ema.shape):
            raise ValueError(f"record_usage: expected hits of shape {tuple(self.usage_ema.shape)}, "
                             f"got {tuple(hits.shape)}")
        hits = hits.to(self.usage_ema)
        n = int(self.usage_steps)
        if n == 0:
            self.usage_ema.copy_(hits)
        elif n < 100:
            self.usage_ema.mul_(0.9).add_(hits.mul(0.1))
        else:
            self.usage_ema.mul_(0.99).add_(hits.mul(0.01))
        self.usage_steps.add_(1)

    def usage(self, tokens_per_step: int | None = None) -> list[float]:
        """Per scale, % of codewords whose EMA hit count is above VAR's margin
        (8% of a uniform share of ``tokens_per_step``, default: the finest scale's tokens per batch)."""
        if tokens_per_step is None:
            tokens_per_step = int(self.usage_ema[-1].sum().item()) or 1
        margin = tokens_per_step / self.vocab_size * 0.08
        return [(row >= margin).float().mean().item() * 100 for row in self.usage_ema]


class MultiScaleResidualQuantizer(ResidualQuantizer):
    """One codebook, K scales, residual quantization through a :class:`LatentPyramid`.

    Args:
        vocab_size: number of codewords V.
        dim: latent channels C.
        pyramid: restriction/prolongation of the modality; a schedule or list of grid
            shapes builds a :class:`GridPyramid`.
        share_phi: 0 = one phi per scale, 1 = one shared, n = n partially shared.
        phi_ratio: r in ``(1 - r) h + r conv(h)``; 0 disables phi.
        phi_kernel: kernel size of phi (an int or a per-axis tuple); default 3 on grids, 1 on
            token-count scales.
        phi_neighbourhood: ``(N, N)`` neighbourhood operator on the full latent for pyramids
            without a grid (see :class:`NeighbourhoodPhi`); replaces the pointwise phi.
        beta: commitment weight.
        l2_norm: nearest codeword by cosine similarity (VAR's ``using_znorm``).
        num_phi: number of phi convs when ``share_phi == 0`` (default: number of scales).

    State besides the codebook and phi: ``usage_ema`` ``(K, V)``, an EMA of codeword hits per
    scale, and ``usage_steps``, how many batches it has seen (both saved with the module).
    """

    def __init__(self, vocab_size: int, dim: int, pyramid: LatentPyramid | ScaleSchedule | Sequence,
                 share_phi: int = 4, phi_ratio: float = 0.5, phi_kernel: int | tuple[int, ...] | None = None,
                 beta: float = 0.25, l2_norm: bool = False, num_phi: int | None = None,
                 phi_neighbourhood: torch.Tensor | None = None):
        super().__init__(vocab_size, dim, pyramid, share_phi=share_phi, phi_ratio=phi_ratio, phi_kernel=phi_kernel,
                         beta=beta, num_phi=num_phi, phi_neighbourhood=phi_neighbourhood)
        self.l2_norm = l2_norm
        self.embedding = nn.Embedding(self.vocab_size, self.dim)
        self._init_usage((self.vocab_size,))

    @property
    def code_weight(self) -> torch.Tensor:
        return self.embedding.weight

    def encode_tokens(self, z: torch.Tensor, k: int) -> torch.Tensor:
        return self.nearest(z)

    # ------------------------------------------------------------------ codes
    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codeword for every row of ``z`` ``(N, C)`` -> ``(N,)``."""
        E = self.embedding.weight.data
        if self.l2_norm:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(E.T, dim=0), dim=1)
        # ||z||^2 + ||e||^2 - 2 z.e, in VAR's exact order of operations (ties break identically)
        d = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(E.square(), dim=1, keepdim=False)
        d.addmm_(z, E.T, alpha=-2, beta=1)
        return torch.argmin(d, dim=1)

    def lookup(self, idx: torch.Tensor, k: int) -> torch.Tensor:
        """Codewords of scale k: ``(B, n_k)`` long -> ``(B, C, *shape_k)``."""
        return from_tokens(self.embedding(idx), self.schedule.shape(k))

    def embed_probs(self, probs: torch.Tensor, k: int) -> torch.Tensor:
        """Soft codewords (for Gumbel smoothing): ``(B, n_k, V)`` probabilities -> ``(B, C, *shape_k)``."""
        return from_tokens(probs @ self.embedding.weight.unsqueeze(0), self.schedule.shape(k))

    @torch.no_grad()
    def restart_dead_codes(self, f: torch.Tensor, threshold: float = 1e-3,
                           generator: torch.Generator | None = None) -> int:
        """Re-seed codewords whose EMA hits (summed over scales) fall below ``threshold``
        with random latent vectors from ``f`` ``(B, C, *full)``; returns how many."""
        dead = self.usage_ema.sum(0) < threshold
        n_dead = int(dead.sum())
        if n_dead == 0 or int(self.usage_steps) == 0:
            return 0
        pool = to_tokens(f.detach().float()).reshape(-1, self.dim)
        pick = torch.randint(0, pool.shape[0], (n_dead,), generator=generator, device=pool.device)
        self.embedding.weight.data[dead] = pool[pick].to(self.embedding.weight.dtype)
        self.usage_ema[:, dead] = threshold  # give them a grace period
        return n_dead


def make_quantizer(kind: str, dim: int, pyramid: LatentPyramid | ScaleSchedule | Sequence, *,
                   vocab_size: int | None = None, levels: Sequence[int] | None = None, bits: int | None = None,
                   **kw) -> ResidualQuantizer:
    """A multi-scale residual quantizer by name, all with the same contract and vocabulary V:

    * ``"vq"``: :class:`MultiScaleResidualQuantizer` with ``vocab_size`` codewords (VAR);
    * ``"fsq"``: :class:`msar.fsq.FSQQuantizer` with grid ``levels`` (default
      :func:`msar.fsq.default_levels` of ``vocab_size``; V = prod(levels));
    * ``"bitwise"``: :class:`msar.bitwise.BitwiseQuantizer` with ``bits`` per token (default
      ``log2(vocab_size)``; V = 2^bits).

    So ``make_quantizer(kind, C, pyramid, vocab_size=4096)`` gives each kind 12 bits per token.
    ``kw``: the phi and loss arguments common to all (``share_phi``, ``phi_ratio``, ``beta`` ...;
    ``l2_norm`` is VQ's only)."""
    if kind == "vq":
        if vocab_size is None:
            raise ValueError("make_quantizer('vq'): pass vocab_size")
        return MultiScaleResidualQuantizer(vocab_size, dim, pyramid, **kw)
    if kind == "fsq":
        from .fsq import FSQQuantizer, default_levels
        if not levels and vocab_size is None:
            raise ValueError("make_quantizer('fsq'): pass levels (e.g. (8, 8, 8, 8) for 12 bits) or vocab_size")
        q = FSQQuantizer(levels or default_levels(vocab_size), dim, pyramid, **kw)
    elif kind == "bitwise":
        from .bitwise import BitwiseQuantizer
        if bits is None:
            if vocab_size is None or vocab_size < 2 or vocab_size & (vocab_size - 1):
                raise ValueError(f"make_quantizer('bitwise'): pass bits, or a vocab_size that is a power of 2 "
                                 f"(got {vocab_size})")
            bits = vocab_size.bit_length() - 1
        q = BitwiseQuantizer(bits, dim, pyramid, **kw)
    else:
        raise ValueError(f"quantizer kind must be 'vq', 'fsq' or 'bitwise', got {kind!r}")
    if vocab_size is not None and q.vocab_size != vocab_size:
        raise ValueError(f"make_quantizer({kind!r}): its vocabulary is {q.vocab_size}, not vocab_size={vocab_size}")
    return q
