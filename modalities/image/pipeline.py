"""An image generation pipeline: VQ-VAE tokenizer + next-scale transformer, with sampling,
zero-shot editing (inpainting / outpainting / class-conditional editing) and save / load."""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from msar import NextScaleTransformer, TransformerConfig, sample
from msar.editing import grid_known_masks

from .vqvae import VQVAE, VQVAEConfig

FORMAT = "msar-image-pipeline"


class ImagePipeline:
    """``pipe.sample(labels)`` -> images ``(B, C, H, W)`` in [-1, 1]; ``pipe.edit(img, mask, label)``."""

    def __init__(self, vqvae: VQVAE, transformer: NextScaleTransformer):
        if vqvae.schedule.token_counts != transformer.schedule.token_counts:
            raise ValueError(f"tokenizer schedule {vqvae.schedule} does not match transformer {transformer.schedule}")
        self.vqvae, self.transformer = vqvae.eval(), transformer.eval()

    @property
    def device(self) -> torch.device:
        return self.transformer.pos_1LC.device

    def to(self, device) -> "ImagePipeline":
        self.vqvae.to(device)
        self.transformer.to(device)
        return self

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
             threshold: float = 0.5, more_smooth: bool = False, return_indices: bool = False):
        """Zero-shot editing: regenerate the region where ``mask`` is True (inpainting; an
        inverted mask gives outpainting), conditioned on ``labels`` (class-conditional
        editing). Tokens whose area lies mostly outside the mask are teacher-forced to the
        encoded image's tokens at every scale; the rest are sampled."""
        images = images.to(self.device)
        B = images.shape[0]
        if isinstance(labels, int):
            labels = torch.full((B,), labels, dtype=torch.long)
        ref = self.vqvae.encode(images)
        keep = self.latent_keep_mask((~mask.bool()).to(self.device))
        known_mask = grid_known_masks(self.vqvae.schedule, keep, threshold)
        out = sample(self.transformer, self.vqvae, torch.as_tensor(labels, device=self.device), cfg=cfg, top_k=top_k,
                     top_p=top_p, seed=seed, known=ref, known_mask=known_mask, more_smooth=more_smooth)
        return (out.data, out.indices, ref, known_mask) if return_indices else out.data

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str) -> None:
        """``directory/{vqvae,transformer}.safetensors`` + ``pipeline.json`` (configs)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.vqvae.state_dict().items()}, os.path.join(directory, "vqvae.safetensors"))
        save_file({k: v.contiguous() for k, v in self.transformer.state_dict().items()},
                  os.path.join(directory, "transformer.safetensors"))
        meta = {"format": FORMAT, "vqvae": self.vqvae.cfg.to_dict(), "transformer": asdict(self.transformer.cfg)}
        tmp = os.path.join(directory, "pipeline.json.tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(directory, "pipeline.json"))

    @classmethod
    def load(cls, directory: str, device: str | torch.device = "cpu") -> "ImagePipeline":
        from safetensors.torch import load_file

        from .checkpoint import CheckpointError, validate_state_dict

        meta_path = os.path.join(directory, "pipeline.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"not an image pipeline directory (no pipeline.json): {directory}")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{meta_path}: not valid JSON (truncated or corrupt?): {e}") from e
        fmt = meta.get("format") if isinstance(meta, dict) else None
        if fmt != FORMAT:
            raise CheckpointError(f"{meta_path}: format {fmt!r} is not {FORMAT!r} (a checkpoint of another modality?)")
        try:
            vqvae = VQVAE(VQVAEConfig(**meta["vqvae"]))
            tcfg = dict(meta["transformer"])
            tcfg["schedule"] = [tuple(s) if isinstance(s, list) else s for s in tcfg["schedule"]]
            transformer = NextScaleTransformer(TransformerConfig(**tcfg))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{meta_path}: the 'vqvae' / 'transformer' configs are missing or invalid: "
                                  f"{type(e).__name__}: {e}") from e
        for model, name in ((vqvae, "vqvae"), (transformer, "transformer")):
            path = os.path.join(directory, f"{name}.safetensors")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image pipeline {directory}: {name} weights missing: {path}")
            try:
                sd = load_file(path)
            except Exception as e:  # SafetensorError: truncated or not a safetensors file
                raise CheckpointError(f"{path}: cannot read (truncated or corrupt?): {e}") from e
            validate_state_dict(model, sd, name)
            model.load_state_dict(sd)
        return cls(vqvae, transformer).to(device)
