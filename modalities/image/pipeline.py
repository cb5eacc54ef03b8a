"""An image generation pipeline: VQ-VAE tokenizer + next-scale transformer, with sampling and
zero-shot editing (inpainting / outpainting / class-conditional editing).

Saved like every msar pipeline: ``pipe.save_pretrained(dir)`` writes ``dir/config.json``,
``dir/tokenizer/`` and ``dir/transformer/``; ``ImagePipeline.from_pretrained(dir)`` (or
``msar.from_pretrained(dir)``) loads it."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from msar import Condition, NextScaleTransformer, Pipeline, sample
from msar.editing import grid_known_masks

from .vqvae import VQVAE


class ImagePipeline(Pipeline):
    """``pipe.sample(labels)`` -> images ``(B, C, H, W)`` in [-1, 1]; ``pipe.edit(img, mask, label)``.

    ``pipe.tokenizer`` (also ``pipe.vqvae``) is the :class:`VQVAE`, ``pipe.transformer`` the
    :class:`~msar.NextScaleTransformer`.  With a ``text_encoder`` (a transformer with
    ``cond_kind="sequence"``) both take ``captions=[...]`` instead of class labels; any
    :class:`msar.Condition` goes in as ``condition=``."""

    def __init__(self, tokenizer: VQVAE, transformer: NextScaleTransformer,
                 text_encoder: torch.nn.Module | None = None):
        super().__init__(tokenizer, transformer, text_encoder=text_encoder)

    @property
    def vqvae(self) -> VQVAE:
        return self.tokenizer

    def _condition(self, captions: Sequence[str] | None, condition: Condition | None) -> Condition | None:
        if captions is None:
            return condition
        if self.text_encoder is None:
            raise ValueError("captions need a pipeline with a text_encoder")
        if condition is not None:
            raise ValueError("pass captions or condition, not both")
        return self.text_encoder.encode(list(captions))

    @torch.no_grad()
    def sample(self, labels: Sequence[int] | torch.Tensor | int | None = None, batch_size: int | None = None,
               cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96, more_smooth: bool = False,
               seed: int | None = None, temperature: float = 1.0, return_indices: bool = False, *,
               captions: Sequence[str] | None = None, condition: Condition | None = None):
        """Class-conditional images (``labels=None`` draws classes uniformly, seeded), or one image
        per caption / condition row."""
        out = sample(self.transformer, self.vqvae, labels, batch_size, cfg=cfg, top_k=top_k, top_p=top_p,
                     more_smooth=more_smooth, seed=seed, temperature=temperature,
                     condition=self._condition(captions, condition))
        return (out.data, out.indices, out.labels) if return_indices else out.data

    def latent_keep_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """Pixel keep-mask ``(B, 1|-, H, W)`` -> fraction kept per latent cell ``(B, h, w)``."""
        if keep.dim() == 3:
            keep = keep.unsqueeze(1)
        side = self.vqvae.cfg.image_size
        if keep.dim() != 4 or keep.shape[1] != 1 or tuple(keep.shape[2:]) != (side, side):
            raise ValueError(f"mask: expected shape (B, 1, {side}, {side}) or (B, {side}, {side}), got {tuple(keep.shape)}")
        return F.interpolate(keep.float(), size=self.vqvae.schedule.shape(-1), mode="area")[:, 0]

    def known_masks(self, mask: torch.Tensor, threshold: float = 0.5, keep_from_scale: int = 0
                    ) -> list[torch.Tensor]:
        """The per-scale ``(B, h_k * w_k)`` known-token masks of an edit that regenerates the pixels
        where ``mask`` is True: a token is kept when at least ``threshold`` of its area lies outside
        the mask and its scale is ``>= keep_from_scale``."""
        keep = self.latent_keep_mask((~mask.bool()).to(self.device))
        known_mask = grid_known_masks(self.vqvae.schedule, keep, threshold)
        return [m & (k >= keep_from_scale) for k, m in enumerate(known_mask)]

    @torch.no_grad()
    def edit(self, images: torch.Tensor, mask: torch.Tensor, labels: Sequence[int] | torch.Tensor | int | None = None,
             cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96, seed: int | None = None,
             threshold: float = 0.5, more_smooth: bool = False, return_indices: bool = False,
             keep_from_scale: int = 0, *, captions: Sequence[str] | None = None,
             condition: Condition | None = None):
        """Zero-shot editing: regenerate the region where ``mask`` is True (inpainting; an
        inverted mask gives outpainting), conditioned on ``labels`` (class-conditional editing;
        None: drawn, or none for an unconditional model) or on ``captions`` / ``condition`` (one
        per image). Tokens of scales ``>= keep_from_scale`` with at least ``threshold`` of their
        area outside the mask are teacher-forced to the encoded image's tokens; the rest are
        sampled. To change the class or the caption, regenerate the coarse scales
        (``keep_from_scale`` >= 1 and ``threshold=1.0``): a coarse token straddling both regions
        decides it."""
        images = images.to(self.device)
        B = images.shape[0]
        condition = self._condition(captions, condition)
        if isinstance(labels, int):
            labels = torch.full((B,), labels, dtype=torch.long)
        if labels is not None:
            labels = torch.as_tensor(labels, device=self.device)
        ref = self.vqvae.encode(images)
        known_mask = self.known_masks(mask, threshold, keep_from_scale)
        out = sample(self.transformer, self.vqvae, labels, B if labels is None and condition is None else None, cfg=cfg,
                     top_k=top_k, top_p=top_p, seed=seed, known=ref, known_mask=known_mask,
                     more_smooth=more_smooth, condition=condition)
        return (out.data, out.indices, ref, known_mask) if return_indices else out.data
