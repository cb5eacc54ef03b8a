"""Known-token masks for zero-shot editing: frame prediction, interpolation, inpainting.

:func:`msar.sample` teacher-forces *known* tokens at every scale.  Which tokens are
known follows one rule, for every pyramid: **a token is known iff its whole
support lies in the known region.**  Two steps make that concrete:

1. pixels -> latent cells (:func:`pixel_to_latent_known`): latent cell ``(t, y, x)``
   covers the frames of its temporal group (frame 0 alone, then ``time_stride``
   frames each) and a ``space_stride`` square; it is known iff all of those pixels are.
2. latent cells -> tokens of every scale (:func:`token_known_masks`): the
   restriction of every pyramid here (area pooling, frame selection, cluster
   averaging) is an average with non-negative weights, so restricting the
   *unknown* indicator gives exactly 0 at a token iff no unknown cell is in its
   support.  That works unchanged for :class:`msar.GridPyramid`,
   :class:`~modalities.video.schedules.FramePyramid` and
   :class:`msar.OperatorPyramid` built from assignments.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from msar import known_masks


def _as_batched_mask(mask: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"{what}: expected a bool tensor (T, H, W) or (B, T, H, W), got "
                        f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}")
    if mask.dim() == 3:
        mask = mask.unsqueeze(0)
    if mask.dim() != 4:
        raise ValueError(f"{what}: expected shape (T, H, W) or (B, T, H, W), got {tuple(mask.shape)}")
    return mask


def pixel_to_latent_known(known: torch.Tensor, time_stride: int, space_stride: int) -> torch.Tensor:
    """``(B, T, H, W)`` (or ``(T, H, W)``) bool pixel mask -> ``(B, T', H', W')`` bool latent mask.

    ``T = 1 + time_stride * (T' - 1)`` (first frame alone), ``H = space_stride * H'``.
    """
    known = _as_batched_mask(known, "known pixels")
    B, T, H, W = known.shape
    if (T - 1) % time_stride or H % space_stride or W % space_stride:
        raise ValueError(f"pixel mask {tuple(known.shape[1:])} does not tile into time groups of {time_stride} "
                         f"(after the first frame) and {space_stride}x{space_stride} squares")
    first = known[:, :1]
    rest = known[:, 1:].reshape(B, (T - 1) // time_stride, time_stride, H, W).all(dim=2)
    k = torch.cat((first, rest), dim=1)  # (B, T', H, W)
    Tl = k.shape[1]
    k = k.reshape(B, Tl, H // space_stride, space_stride, W // space_stride, space_stride)
    return k.all(dim=5).all(dim=3)


def token_known_masks(pyramid, latent_known: torch.Tensor) -> list[torch.Tensor]:
    """Per-scale known masks ``list[(B, n_k) bool]`` from a latent mask ``(B, *full)`` bool.

    ``pyramid`` is any latent pyramid whose ``restrict`` is a non-negative average
    (see the module docstring); token i of scale k is known iff every latent cell
    its restriction reads is known.
    """
    if latent_known.dtype != torch.bool:
        raise TypeError(f"latent_known: expected a bool tensor, got {latent_known.dtype}")
    full = tuple(pyramid.full)
    if latent_known.dim() == len(full):
        latent_known = latent_known.unsqueeze(0)
    if tuple(latent_known.shape[1:]) != full:
        raise ValueError(f"latent_known: expected shape (B, {', '.join(map(str, full))}), got {tuple(latent_known.shape)}")
    return known_masks(pyramid, latent_known, threshold=1.0)


def video_known_masks(tokenizer, known_pixels: torch.Tensor, batch_size: int | None = None) -> list[torch.Tensor]:
    """Pixel mask -> per-scale token masks for a :class:`~modalities.video.tokenizer.VideoTokenizer`.

    ``known_pixels``: ``(T, H, W)`` (shared by the batch, expanded to ``batch_size``) or
    ``(B, T, H, W)`` bool.
    """
    c = tokenizer.config
    latent = pixel_to_latent_known(known_pixels, c.time_stride, c.space_stride)
    if batch_size is not None and latent.shape[0] == 1:
        latent = latent.expand(batch_size, *latent.shape[1:])
    return token_known_masks(tokenizer.quantizer.pyramid, latent)


# ---------------------------------------------------------------------------- task masks (pixel level)
def frame_prediction_mask(frames: int, height: int, width: int, given: int) -> torch.Tensor:
    """``(T, H, W)`` bool: the first ``given`` frames known, the rest to generate."""
    if not 0 <= given <= frames:
        raise ValueError(f"given must lie in [0, {frames}], got {given}")
    m = torch.zeros(frames, height, width, dtype=torch.bool)
    m[:given] = True
    return m


def interpolation_mask(frames: int, height: int, width: int, first: int, last: int) -> torch.Tensor:
    """``(T, H, W)`` bool: the first ``first`` and last ``last`` frames known, the middle generated."""
    if first < 0 or last < 0 or first + last > frames:
        raise ValueError(f"first + last must lie in [0, {frames}], got first={first}, last={last}")
    m = torch.zeros(frames, height, width, dtype=torch.bool)
    m[:first] = True
    if last:
        m[frames - last:] = True
    return m


def box_mask(frames: int, height: int, width: int, box: Sequence[int]) -> torch.Tensor:
    """``(T, H, W)`` bool: everything known except the box ``(y0, y1, x0, x1)`` in every frame
    (spatial inpainting over time)."""
    y0, y1, x0, x1 = box
    if not (0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width):
        raise ValueError(f"box (y0, y1, x0, x1) must lie inside {height}x{width}, got {tuple(box)}")
    m = torch.ones(frames, height, width, dtype=torch.bool)
    m[:, y0:y1, x0:x1] = False
    return m


def fill_unknown(video: torch.Tensor, known_pixels: torch.Tensor, value: float = -1.0) -> torch.Tensor:
    """Blank the unknown pixels of ``video (B, C, T, H, W)`` (to background ``value``) so the
    reference tokens carry no information about what is to be generated."""
    m = _as_batched_mask(known_pixels, "known pixels").unsqueeze(1).to(video.device)
    return torch.where(m, video, torch.full_like(video, value))
