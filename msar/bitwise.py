"""Residual multi-scale bitwise quantization (binary spherical quantization, as in Infinity).

Each token of scale k is ``d`` bits: the signs of its projected residual, a corner of the
hypercube scaled onto the unit sphere::

    u_k   = proj_in(z_k) / g_k                               # (N, d)
    b_k   = u_k > 0                                          # (N, d) bits
    idx_k = sum_j b_k[:, j] 2^j                              # in [0, 2^d): the bits as an integer
    h_k   = g_k * proj_out((2 b_k - 1) / sqrt(d))            # (N, C): the code of scale k

The vocabulary ``2^d`` is never materialised: a transformer predicts the ``d`` bits with
``d`` binary classifiers (``TransformerConfig(head="bitwise", bits=d)``), trained with
:func:`bit_cross_entropy` and sampled with :func:`msar.sampling.sample_bits`.  The residual
loop is :class:`~msar.quantizer.ResidualQuantizer`'s, as for VQ and FSQ.  There is no zero
code: unlike VQ with a zero codeword or FSQ with odd levels, a scale always adds a code of
norm ``g_k`` (through ``proj_out``); the code chosen is the nearest of the ``2^d`` to the
residual while ``proj_out`` is ``proj_in``'s transpose (at initialisation).

Usage statistics are per bit: ``usage_ema`` ``(K, 2, d)`` counts tokens whose bit j is 0 / 1,
and :meth:`BitwiseQuantizer.usage` reports the mean binary entropy of the bits (100 % = every
bit a fair coin).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .fsq import ProjectedQuantizer
from .pyramid import LatentPyramid
from .schedule import ScaleSchedule

#: the largest bit count whose token index fits a signed 64-bit integer
MAX_BITS = 62


def index_to_bits(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """``(...,)`` long -> ``(..., bits)`` long in {0, 1}; bit j of the index is ``out[..., j]``."""
    shifts = torch.arange(bits, device=idx.device)
    return (idx.unsqueeze(-1) >> shifts) & 1


def bits_to_index(b: torch.Tensor) -> torch.Tensor:
    """``(..., d)`` {0, 1} (bool or int) -> ``(...,)`` long ``sum_j b_j 2^j``."""
    shifts = torch.arange(b.shape[-1], device=b.device)
    return (b.long() << shifts).sum(-1)


def bit_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-token loss of bit logits: ``logits (..., d)``, token indices ``target (...,)`` ->
    ``(...,)`` binary cross-entropy averaged over the d bits (Infinity's bitwise loss)."""
    t = index_to_bits(target, logits.shape[-1]).to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, t, reduction="none").mean(-1)


def bit_predictions(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of bit logits ``(..., d)``: ``(...,)`` long (each bit its own argmax)."""
    return bits_to_index(logits > 0)


def flip_bits(idx: torch.Tensor, bits: int, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``idx`` ``(...)`` long with each of its ``bits`` bits flipped independently with probability ``prob``."""
    flips = torch.rand(*idx.shape, bits, generator=generator, device=idx.device) < prob
    return idx ^ bits_to_index(flips)


@torch.no_grad()
def self_correction_batch(tokenizer: Any, data: Any, labels: torch.Tensor | None, flip_prob: float,
                          generator: torch.Generator | None = None
                          ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """Infinity's bitwise self-correction for ``TransformerTrainer(prepare_batch=...)``: the
    teacher-forcing input is built from tokens with a fraction ``flip_prob`` of their bits flipped,
    and the targets of every later scale are re-quantized from the residual the flips leave, so
    the model learns to repair its own sampling mistakes.

    ``tokenizer``: a :class:`~msar.MultiScaleVQTokenizer` with a :class:`BitwiseQuantizer`.
    Returns ``(targets per scale (B, n_k), labels, teacher_input (B, L - n_0, C))``.

    Example::

        prep = lambda raw: self_correction_batch(tok, raw[0], raw[1], flip_prob=0.1)
        TransformerTrainer(model, tok, cfg, prepare_batch=prep)
    """
    q = tokenizer.quantizer
    f = tokenizer.encode_latent(data)
    targets, inputs = q.encode_with_corruption(f, lambda idx, k: flip_bits(idx, q.bits, flip_prob, generator))
    return targets, labels, q.teacher_forcing_input(inputs)


class BitwiseQuantizer(ProjectedQuantizer):
    """Residual multi-scale binary spherical quantization; ``V = 2^bits`` (see the module docstring).

    Args:
        bits: d, bits per token (1 .. 62).
        dim, pyramid and the rest: as for :class:`~msar.fsq.ProjectedQuantizer`.
    """

    def __init__(self, bits: int, dim: int, pyramid: LatentPyramid | ScaleSchedule | Sequence, **kw):
        if not 1 <= int(bits) <= MAX_BITS:
            raise ValueError(f"bits must be in [1, {MAX_BITS}], got {bits}")
        super().__init__(2 ** int(bits), dim, int(bits), pyramid, **kw)
        self.bits = int(bits)
        self._init_usage((2, self.bits))

    def index_to_values(self, idx: torch.Tensor) -> torch.Tensor:
        return (index_to_bits(idx, self.bits).float() * 2 - 1) / math.sqrt(self.bits)

    def bound(self, u: torch.Tensor) -> torch.Tensor:
        return F.normalize(u, dim=-1)

    def quantize(self, u: torch.Tensor) -> torch.Tensor:
        return bits_to_index(u > 0)

    def embed_probs(self, probs: torch.Tensor, k: int) -> torch.Tensor:
        """Expected code under token probabilities ``(B, n_k, 2^d)`` (small d only: the table is
        ``2^d x d``); :meth:`embed_bit_probs` takes per-bit probabilities instead."""
        if self.bits > 20:
            raise ValueError(f"embed_probs over 2^{self.bits} tokens is too large; use embed_bit_probs "
                             "with per-bit probabilities (B, n_k, d)")
        return super().embed_probs(probs, k)

    def embed_bit_probs(self, p_one: torch.Tensor, k: int) -> torch.Tensor:
        """Expected code when bit j is 1 with probability ``p_one[..., j]`` ``(B, n_k, d)``
        (independent bits): ``g_k proj_out((2 p - 1) / sqrt(d))`` -> ``(B, C, *shape_k)``."""
        return self._codes((p_one * 2 - 1) / math.sqrt(self.bits), k)

    def batch_hits(self, idx: torch.Tensor) -> torch.Tensor:
        """``(N,)`` indices -> ``(2, d)``: how many tokens have bit j equal to 0 (row 0) and 1 (row 1)."""
        ones = index_to_bits(idx, self.bits).sum(0).float()
        return torch.stack((idx.shape[0] - ones, ones))

    def usage(self, tokens_per_step: int | None = None) -> list[float]:
        """Per scale, the mean binary entropy of the bits in % of 1 bit (from ``usage_ema``;
        ``tokens_per_step`` is ignored: bit frequencies need no margin)."""
        p = self.usage_ema[:, 1] / self.usage_ema.sum(1).clamp_min(1e-12)  # (K, d)
        h = -(p * p.clamp_min(1e-12).log2() + (1 - p) * (1 - p).clamp_min(1e-12).log2())
        return [float(v) * 100 for v in h.mean(-1)]
