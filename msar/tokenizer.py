"""The pyramid tokenizer protocol, and the shared multi-scale VQ tokenizer that implements it.

A modality adapter is a :class:`PyramidTokenizer`.  Almost every adapter is a
:class:`MultiScaleVQTokenizer`: the modality writes an encoder ``data -> (B, C,
*full)``, a decoder ``(B, C, *full) -> data`` and a :class:`~msar.pyramid.LatentPyramid`
(restriction / prolongation), and gets encoding, decoding, teacher forcing and
incremental generation from the shared :class:`~msar.quantizer.MultiScaleResidualQuantizer`.

Contract (``B`` batch, ``K`` scales, ``n_k`` tokens of scale k, ``L = sum n_k``, ``C`` latent dim):

==============================================  ==================================================
``schedule``                                    the :class:`ScaleSchedule`
``vocab_size``, ``latent_dim``                  V and C
``encode(data) -> list[(B, n_k) long]``         token indices per scale
``decode(indices) -> data``                     inverse of encode (up to quantization)
``teacher_forcing_input(indices)``              ``(B, L - n_0, C)`` transformer input of scales 1..K-1
``start(batch_size, device, context=None)``     a :class:`DecodeState` for generation; ``context`` is
                                                the adapter's per-sample information (e.g. each
                                                sample's own hierarchy), ``None`` when it needs none
``state.add_scale(k, idx, probs=None)``         add scale k; returns the ``(B, n_{k+1}, C)`` input of
                                                scale k+1, or ``None`` after the last scale
``state.indices``                               the ``(B, n_j)`` tokens added so far (j < k)
``finish(state) -> data``                       decode what the state accumulated
==============================================  ==================================================

One declared extension: a tokenizer whose tokens are *choices among structured candidates* (a
vertex split names two neighbours, a move names a square) may also implement
:class:`CandidateFeatures`: ``candidate_dim`` and ``candidate_features(x) -> (B, n, V, F)``, the
features of every token of a scale computed from that scale's input ``x (B, n, C)``.  A model built
with ``TransformerConfig(candidate_dim=F)`` then scores each token with them as well as with its
linear head; the trainer and the sampler call ``candidate_features`` on the teacher-forcing input and
on each ``add_scale`` output, so the model's logits stay a function of the same inputs in both.

The invariant that makes training and sampling agree (checked by
:mod:`msar.testing`): feeding the ground-truth indices to ``state.add_scale``
scale by scale yields exactly ``teacher_forcing_input(indices)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

from .quantizer import QuantizerOutput, ResidualQuantizer
from .schedule import ScaleSchedule


@runtime_checkable
class DecodeState(Protocol):
    """Incremental generation state of a tokenizer (made by ``tokenizer.start``)."""

    indices: list[torch.Tensor]

    def add_scale(self, k: int, idx: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor | None:
        """Add the sampled tokens ``(B, n_k)`` of scale k (``probs`` ``(B, n_k, V)`` for
        soft codewords); return the ``(B, n_{k+1}, C)`` input of the next scale or None."""
        ...


@runtime_checkable
class PyramidTokenizer(Protocol):
    """What a modality implements. See the module docstring for the contract."""

    schedule: ScaleSchedule
    vocab_size: int
    latent_dim: int

    def encode(self, data: Any) -> list[torch.Tensor]: ...

    def decode(self, indices: Sequence[torch.Tensor]) -> Any: ...

    def teacher_forcing_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor: ...

    def start(self, batch_size: int, device: torch.device | str, context: Any = None) -> DecodeState: ...

    def finish(self, state: DecodeState) -> Any: ...


@runtime_checkable
class CandidateFeatures(Protocol):
    """The extension of a :class:`PyramidTokenizer` whose model scores candidate tokens by their
    features (``TransformerConfig.candidate_dim``); see the module docstring."""

    candidate_dim: int

    def candidate_features(self, x: torch.Tensor) -> torch.Tensor:
        """Next-scale input ``(B, n, C)`` (teacher forcing: ``(B, L - n_0, C)``) -> ``(B, n, V, F)``
        float features of every token at each position, ``F = candidate_dim``.  Position ``p``'s
        features must depend on its own input ``x[:, p]`` alone: teacher forcing passes every scale at
        once, sampling one scale at a time, and both must see the same features."""
        ...


def check_candidate_features(tokenizer: Any, candidate_dim: int) -> None:
    """Raise unless ``tokenizer`` supplies the candidate features a model with ``candidate_dim``
    (``TransformerConfig.candidate_dim``, > 0) scores."""
    if not isinstance(tokenizer, CandidateFeatures):
        raise TypeError(f"the model scores candidate tokens (candidate_dim={candidate_dim}) but "
                        f"{type(tokenizer).__name__} does not implement msar.tokenizer.CandidateFeatures")
    if tokenizer.candidate_dim != candidate_dim:
        raise ValueError(f"the tokenizer's candidate_dim {tokenizer.candidate_dim} differs from the model's "
                         f"{candidate_dim}")


def candidate_features(tokenizer: Any, candidate_dim: int, x: torch.Tensor) -> torch.Tensor | None:
    """``tokenizer.candidate_features(x)`` for a model with ``candidate_dim > 0`` (checked), ``None``
    for a model without candidate scoring."""
    if not candidate_dim:
        return None
    check_candidate_features(tokenizer, candidate_dim)
    return tokenizer.candidate_features(x)


class ResidualDecodeState:
    """Accumulates ``f_hat`` ``(B, C, *full)`` scale by scale through a quantizer.

    ``add_scale`` validates its input (it is the public step a user may drive by hand)
    and delegates to :meth:`ResidualQuantizer.add_scale`, the same step
    teacher forcing uses.
    """

    def __init__(self, quantizer: ResidualQuantizer, batch_size: int, device: torch.device | str):
        if isinstance(batch_size, bool) or not hasattr(batch_size, "__index__") or batch_size < 0:
            raise ValueError(f"batch_size: expected an int >= 0, got {batch_size!r}")
        self.quantizer = quantizer
        self.schedule = quantizer.schedule
        self.f_hat = quantizer.code_weight.new_zeros(batch_size, quantizer.dim, *quantizer.full_shape).to(device)
        self.indices: list[torch.Tensor] = []
        self.k = 0

    def add_scale(self, k: int, idx: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor | None:
        """Add scale k's tokens ``(B, n_k)`` (or soft ``probs`` ``(B, n_k, V)``); returns the
        ``(B, n_{k+1}, C)`` transformer input of scale k+1, ``None`` after the last scale."""
        if k != self.k:
            raise ValueError(f"scales must be added in order: expected scale {self.k}, got {k}")
        if k >= len(self.schedule):
            raise ValueError(f"all {len(self.schedule)} scales have been added already")
        n, B, q = self.schedule.token_counts[k], self.f_hat.shape[0], self.quantizer
        if not isinstance(idx, torch.Tensor):
            raise TypeError(f"scale {k}: expected indices as a tensor ({B}, {n}), got {type(idx).__name__}")
        if idx.dim() != 2 or idx.shape[1] != n or idx.shape[0] != B:
            raise ValueError(f"scale {k}: expected indices of shape ({B}, {n}), got {tuple(idx.shape)}")
        if probs is None:
            if idx.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"scale {k}: expected integer indices (int64 or int32), got dtype {idx.dtype}")
            # range checked on CPU only: on an accelerator it would stall every scale of sampling
            # (whose indices are in range by construction) on a device-to-host copy
            if idx.numel() and idx.device.type == "cpu" and (int(idx.min()) < 0 or int(idx.max()) >= q.vocab_size):
                raise ValueError(f"scale {k}: token index out of range [0, {q.vocab_size}): found min "
                                 f"{int(idx.min())}, max {int(idx.max())}")
        elif tuple(probs.shape) != (B, n, q.vocab_size):
            raise ValueError(f"scale {k}: expected probs of shape ({B}, {n}, {q.vocab_size}), got {tuple(probs.shape)}")
        h = q.lookup(idx, k) if probs is None else q.embed_probs(probs, k)
        self.f_hat, nxt = q.add_scale(self.f_hat, k, h)
        self.indices.append(idx)
        self.k += 1
        return nxt


class MultiScaleVQTokenizer(nn.Module):
    """A multi-scale residual VQ-VAE: ``encoder -> quant_conv -> quantizer -> post_quant_conv -> decoder``.

    Args:
        encoder: ``data -> (B, C, *full)`` module.
        decoder: ``(B, C, *full) -> data`` module.
        quantizer: the shared residual quantizer (holds schedule and pyramid): VQ, FSQ or bitwise
            (:func:`msar.make_quantizer`).
        quant_conv, post_quant_conv: optional modules around the quantizer
            (VAR uses 3x3 convs); identity when omitted.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, quantizer: ResidualQuantizer,
                 quant_conv: nn.Module | None = None, post_quant_conv: nn.Module | None = None):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.quantizer = quantizer
        self.quant_conv = quant_conv if quant_conv is not None else nn.Identity()
        self.post_quant_conv = post_quant_conv if post_quant_conv is not None else nn.Identity()

    # ------------------------------------------------------------------ protocol attributes
    @property
    def schedule(self) -> ScaleSchedule:
        """The quantizer's scale schedule."""
        return self.quantizer.schedule

    @property
    def vocab_size(self) -> int:
        """Codebook size V."""
        return self.quantizer.vocab_size

    @property
    def latent_dim(self) -> int:
        """Codeword size C (the transformer's input width)."""
        return self.quantizer.dim

    # ------------------------------------------------------------------ latent <-> data
    def check_data(self, data: torch.Tensor) -> None:
        """Raise a clear error for malformed input; adapters override (the default accepts all)."""

    def encode_latent(self, data: torch.Tensor) -> torch.Tensor:
        """``data -> (B, C, *full)`` continuous latent before quantization."""
        self.check_data(data)
        return self.quant_conv(self.encoder(data))

    def decode_latent(self, f_hat: torch.Tensor) -> torch.Tensor:
        """``(B, C, *full)`` latent -> data."""
        return self.decoder(self.post_quant_conv(f_hat))

    # ------------------------------------------------------------------ protocol
    @torch.no_grad()
    def encode(self, data: torch.Tensor) -> list[torch.Tensor]:
        """``data`` -> per scale ``(B, n_k)`` long token indices."""
        return self.quantizer.encode(self.encode_latent(data))

    @torch.no_grad()
    def decode(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per scale ``(B, n_k)`` indices -> data (the sum of all scales' contributions, decoded)."""
        return self.decode_latent(self.quantizer.indices_to_fhat(indices))

    @torch.no_grad()
    def decode_progression(self, indices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Data decoded from scales ``<= k`` for every k: the coarse-to-fine progression."""
        return [self.decode_latent(f) for f in self.quantizer.indices_to_fhat_progression(indices)]

    @torch.no_grad()
    def teacher_forcing_input(self, indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per scale ``(B, n_k)`` indices -> ``(B, L - n_0, C)`` transformer input of scales 1..K-1."""
        return self.quantizer.teacher_forcing_input(indices)

    def start(self, batch_size: int, device: torch.device | str, context: Any = None) -> ResidualDecodeState:
        """A fresh decode state for ``batch_size`` samples. This tokenizer needs no per-sample
        ``context``; an adapter that does (e.g. per-sample operators) overrides ``start``."""
        if context is not None:
            raise TypeError(f"{type(self).__name__}.start takes no context (got {type(context).__name__}); "
                            "adapters that need per-sample context override start()")
        return ResidualDecodeState(self.quantizer, batch_size, device)

    @torch.no_grad()
    def finish(self, state: ResidualDecodeState) -> torch.Tensor:
        """Decode the latent a state accumulated to data."""
        return self.decode_latent(state.f_hat)

    # ------------------------------------------------------------------ training
    def forward(self, data: torch.Tensor) -> tuple[torch.Tensor, QuantizerOutput]:
        """Training forward: ``(reconstruction, quantizer output)``."""
        q = self.quantizer(self.encode_latent(data))
        return self.decode_latent(q.f_hat), q
