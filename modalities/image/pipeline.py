"""An image generation pipeline: VQ-VAE tokenizer + next-scale transformer, with sampling and
zero-shot editing (inpainting / outpainting / class-conditional editing).

Saved like every msar pipeline: ``pipe.save_pretrained(dir)`` writes ``dir/config.json``,
``dir/tokenizer/`` and ``dir/transformer/``; ``ImagePipeline.from_pretrained(dir)`` (or
``msar.from_pretrained(dir)``) loads it."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from msar import NextScaleTransformer, Pipeline, sample
from msar.editing import grid_known_masks

from .vqvae import VQVAE


class ImagePipeline(Pipeline):
    """``pipe.sample(labels)`` -> images ``(B, C, H, W)`` in [-1, 1]; ``pipe.edit(img, mask, label)``.

    ``pipe.tokenizer`` (also ``pipe.vqvae``) is the :class:`VQVAE`, ``pipe.transformer`` the
    :class:`~msar.NextScaleTransformer`."""

    def __init__(self, tokenizer: VQVAE, transformer: NextScaleTransformer):
        super().__init__(tokenizer, transformer)

    @property
    def vqvae(self) -> VQVAE:
        return self.tokenizer

    @torch.no_grad()
    def sample(self, labels: Optional[Sequence[int] | torch.Tensor | int] = None, batch_size: Optional[int] = None,
               cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96, more_smooth: bool = False,
               seed: Optional[int] = None, temperature: float = 1.0, return_indices: bool = False):
        """Class-conditional images; ``labels=None`` draws classes uniformly (seeded)."""
        out = sample(self.transformer, self.vqvae, labels, batch_size, cfg=cfg, top_k=top_k, top_p=top_p,
                     more_smooth=more_smooth, seed=seed, temperature=temperature)
        return (out.data, out.indices, out.labels) if return_indices else out.data

    def latent_keep_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """Pixel keep-mask ``(B, 1|-, H, W)`` -> fraction kept per latent cell ``(B, h, w)``."""
        if keep.dim() == 3:
            keep = keep.unsqueeze(1)
        side = self.vqvae.cfg.image_size
        if keep.dim() != 4 or keep.shape[1] != 1 or tuple(keep.shape[2:]) != (side, side):
            raise ValueError(f"mask: expected shape (B, 1, {side}, {side}) or (B, {side}, {side}), got {tuple(keep.shape)}")
        return F.interpolate(keep.float(), size=self.vqvae.schedule.shape(-1), mode="area")[:, 0]

    @torch.no_grad()
    def edit(self, images: torch.Tensor, mask: torch.Tensor, labels: Sequence[int] | torch.Tensor | int,
             cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96, seed: Optional[int] = None,
             threshold: float = 0.5, more_smooth: bool = False, return_indices: bool = False,
             keep_from_scale: int = 0):
        """Zero-shot editing: regenerate the region where ``mask`` is True (inpainting; an
        inverted mask gives outpainting), conditioned on ``labels`` (class-conditional
        editing). Tokens of scales ``>= keep_from_scale`` with at least ``threshold`` of their
        area outside the mask are teacher-forced to the encoded image's tokens; the rest are
        sampled. To change the class, regenerate the coarse scales (``keep_from_scale`` >= 1
        and ``threshold=1.0``): a coarse token straddling both regions decides the class."""
        images = images.to(self.device)
        B = images.shape[0]
        if isinstance(labels, int):
            labels = torch.full((B,), labels, dtype=torch.long)
        ref = self.vqvae.encode(images)
        keep = self.latent_keep_mask((~mask.bool()).to(self.device))
        known_mask = grid_known_masks(self.vqvae.schedule, keep, threshold)
        known_mask = [m & (k >= keep_from_scale) for k, m in enumerate(known_mask)]
        out = sample(self.transformer, self.vqvae, torch.as_tensor(labels, device=self.device), cfg=cfg, top_k=top_k,
                     top_p=top_p, seed=seed, known=ref, known_mask=known_mask, more_smooth=more_smooth)
        return (out.data, out.indices, ref, known_mask) if return_indices else out.data
