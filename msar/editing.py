"""Known-token masks for zero-shot editing on grid schedules (inpainting, outpainting,
frame prediction, shape completion): which tokens of each scale to teacher-force."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .schedule import ScaleSchedule


def grid_known_masks(schedule: ScaleSchedule, keep: torch.Tensor, threshold: float = 0.5) -> list[torch.Tensor]:
    """Per-scale bool masks ``(B, n_k)`` of tokens to keep from a reference.

    Args:
        schedule: a grid schedule.
        keep: ``(B, *full)`` bool/float, 1 where the reference is kept, on the grid of the
            last scale (the latent grid; a modality first maps its data-space mask onto it).
        threshold: a token of scale k is known when at least this fraction of its area
            (area pooling of ``keep`` onto scale k) is kept. 1.0 keeps only tokens lying
            wholly in the kept region.
    """
    full = schedule.shape(-1)
    if keep.dim() != 1 + len(full) or tuple(keep.shape[1:]) != tuple(full):
        raise ValueError(f"keep mask: expected shape (B, {', '.join(map(str, full))}) on the last scale's grid, "
                         f"got {tuple(keep.shape)}")
    k = keep.float().unsqueeze(1)  # (B, 1, *full)
    out = []
    for s in range(len(schedule)):
        frac = F.interpolate(k, size=schedule.shape(s), mode="area") if schedule.shape(s) != full else k
        out.append((frac >= threshold - 1e-6).flatten(1))
    return out
