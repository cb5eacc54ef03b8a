"""Known-token masks for zero-shot editing (inpainting, outpainting, forecasting, frame
prediction, shape completion): which tokens of each scale to teacher-force.

Editing keeps a region of a reference and generates the rest: encode the reference,
mark per scale which tokens are *known*, and let :func:`msar.sample` force those
(``known=``, ``known_mask=``). The marking is done through the pyramid's own
restriction::

    frac_k = restrict(keep, k)           # (B, n_k): the kept fraction of every token's support
    known_k = frac_k >= threshold

For averaging pyramids (area pooling, cluster means) ``frac_k`` is exactly the fraction of
the fine cells a token reads that lie in the kept region, so the rule works for every
pyramid: grids, per-frame pyramids, cluster hierarchies.
"""
from __future__ import annotations

import torch

from .pyramid import GridPyramid, LatentPyramid
from .schedule import ScaleSchedule

__all__ = ["known_masks", "grid_known_masks"]

_EPS = 1e-6  # float slack of the averaged fractions (1/3 + 1/3 + 1/3 may not be exactly 1)


def known_masks(pyramid: LatentPyramid, keep: torch.Tensor, threshold: float = 0.5) -> list[torch.Tensor]:
    """Per-scale bool masks ``(B, n_k)`` of the tokens to keep from a reference.

    Args:
        pyramid: the tokenizer's pyramid (``tokenizer.quantizer.pyramid`` of a
            :class:`~msar.tokenizer.MultiScaleVQTokenizer`); its restriction must average
            (``msar.testing.check_pyramid`` checks that).
        keep: ``(B, *pyramid.full)`` bool or float in [0, 1], 1 where the reference is kept, on
            the full-resolution latent (a modality first maps its data-space mask onto it).
        threshold: a token of scale k is known when at least this fraction of its support
            (the fine cells its restriction averages, with their weights) is kept:

            * ``1.0``: only tokens whose whole support is kept. Nothing of the generated region
              comes from the reference, but coarse tokens straddling the boundary -- always
              the single token of a 1-token first scale, unless everything is kept -- are
              regenerated, so the decoded kept region moves by what those tokens carried (its
              fine tokens stay the reference's).
            * a small value such as ``1e-3`` (any overlap): every token touching the kept
              region is the reference's, so with hard-cluster pyramids and pointwise phi the
              kept region's latent is reproduced exactly; the generated region then inherits
              the reference's coarse content (it only adds detail).
            * ``0.5`` (default): tokens mostly kept are the reference's -- a compromise.

    Returns:
        ``[(B, n_k) bool]`` per scale, on ``keep``'s device.
    """
    full = tuple(int(d) for d in pyramid.full)
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"keep: expected a tensor (B, {', '.join(map(str, full))}), got {type(keep).__name__}")
    if keep.dim() != 1 + len(full) or tuple(keep.shape[1:]) != full:
        raise ValueError(f"keep mask: expected shape (B, {', '.join(map(str, full))}) on the full-resolution latent, "
                         f"got {tuple(keep.shape)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must lie in (0, 1] (the kept fraction of a token's support), got {threshold}")
    k = keep.float().unsqueeze(1)  # (B, 1, *full)
    if k.numel() and (float(k.min()) < 0 or float(k.max()) > 1):
        raise ValueError(f"keep mask: values must lie in [0, 1], got [{float(k.min())}, {float(k.max())}]")
    return [pyramid.restrict(k, s).flatten(1) >= threshold - _EPS for s in range(len(pyramid.schedule))]


def grid_known_masks(schedule: ScaleSchedule, keep: torch.Tensor, threshold: float = 0.5) -> list[torch.Tensor]:
    """:func:`known_masks` on a grid schedule: the area-pooling restriction of
    :class:`~msar.pyramid.GridPyramid` (``keep`` is ``(B, *schedule.shape(-1))``)."""
    return known_masks(GridPyramid(schedule), keep, threshold)
