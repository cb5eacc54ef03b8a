"""Voxel pyramid tokenizer: a 3-D convolutional multi-scale residual VQ-VAE over occupancy grids.

``occupancy (B, R, R, R) -> encoder -> latent (B, C, S, S, S) -> residual quantizer
over cubic scales 1^3 .. S^3 (area down, trilinear up) -> decoder -> logits (B, R, R, R)``.

Full-resolution work is kept to one cheap conv on each side (the stem has one
input channel, the head one output channel) so the model trains on a CPU; the
residual blocks run at R/2 and below.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from msar import GridPyramid, MultiScaleVQTokenizer, PretrainedMixin, ScaleSchedule, make_quantizer

_DEFAULT_SIDES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def default_sides(latent_side: int) -> tuple[int, ...]:
    """VAR-like cube sides ending at ``latent_side``: 4 -> (1, 2, 3, 4); 8 -> (1, 2, 3, 4, 6, 8)."""
    sides = tuple(s for s in _DEFAULT_SIDES if s < latent_side) + (latent_side,)
    return sides


@dataclass
class VoxelTokenizerConfig:
    """Hyper-parameters of :func:`build_voxel_tokenizer`.

    resolution: occupancy grid side R (a power-of-two multiple of ``latent_side``).
    latent_side: side S of the finest token grid (R / S = 2^n_down).
    sides: cube sides of the scales (default :func:`default_sides`).
    width: channels after the stem; doubled at each downsampling, capped at ``max_width``.
    """

    resolution: int = 32
    latent_side: int = 8
    sides: tuple[int, ...] | None = None
    vocab_size: int = 512
    latent_dim: int = 32
    width: int = 16
    max_width: int = 64
    phi_ratio: float = 0.5
    share_phi: int = 4
    beta: float = 0.25
    # "vq", "fsq" or "bitwise": the residual quantizer, same vocab_size (msar.make_quantizer)
    quantizer: str = "vq"

    def __post_init__(self):
        R, S = self.resolution, self.latent_side
        if not isinstance(R, int) or not isinstance(S, int) or R <= 0 or S <= 0:
            raise ValueError(f"resolution and latent_side must be positive ints, got {R!r} and {S!r}")
        ratio = R // S
        if R % S != 0 or ratio < 2 or ratio & (ratio - 1):
            raise ValueError(f"resolution / latent_side must be a power of two >= 2, got {R} / {S}")
        self.sides = tuple(self.sides) if self.sides is not None else default_sides(S)
        if self.sides[-1] != S or list(self.sides) != sorted(set(self.sides)):
            raise ValueError(f"sides must increase strictly and end at latent_side={S}, got {self.sides}")

    @property
    def n_down(self) -> int:
        return int(math.log2(self.resolution // self.latent_side))

    def to_dict(self) -> dict:
        return asdict(self)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, ch), ch)


class ResBlock3d(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` on ``(B, ch, D, H, W)``."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv3d(ch, ch, 3, padding=1),
                                  _norm(ch), nn.SiLU(), nn.Conv3d(ch, ch, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class VoxelEncoder(nn.Module):
    """``(B, R, R, R)`` occupancy in [0, 1] -> ``(B, C, S, S, S)`` latent."""

    def __init__(self, cfg: VoxelTokenizerConfig):
        super().__init__()
        ch = cfg.width
        layers: list[nn.Module] = [nn.Conv3d(1, ch, 3, padding=1)]
        for _ in range(cfg.n_down):
            nxt = min(2 * ch, cfg.max_width)
            layers += [nn.Conv3d(ch, nxt, 4, stride=2, padding=1), ResBlock3d(nxt)]
            ch = nxt
        layers += [_norm(ch), nn.SiLU(), nn.Conv3d(ch, cfg.latent_dim, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float().unsqueeze(1))


class VoxelDecoder(nn.Module):
    """``(B, C, S, S, S)`` latent -> ``(B, R, R, R)`` occupancy logits."""

    def __init__(self, cfg: VoxelTokenizerConfig):
        super().__init__()
        chans = [cfg.width]
        for _ in range(cfg.n_down):
            chans.append(min(2 * chans[-1], cfg.max_width))
        ch = chans[-1]
        layers: list[nn.Module] = [nn.Conv3d(cfg.latent_dim, ch, 3, padding=1), ResBlock3d(ch)]
        for i in range(cfg.n_down, 0, -1):
            nxt = chans[i - 1]
            layers.append(nn.ConvTranspose3d(ch, nxt, 4, stride=2, padding=1))
            if i > 1:  # no residual block at full resolution (the costly level on a CPU)
                layers.append(ResBlock3d(nxt))
            ch = nxt
        layers += [_norm(ch), nn.SiLU(), nn.Conv3d(ch, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f).squeeze(1)


class VoxelTokenizer(PretrainedMixin, MultiScaleVQTokenizer):
    """Multi-scale VQ tokenizer of occupancy grids ``(B, R, R, R)`` (float in [0, 1] or bool).

    ``decode`` / ``finish`` return occupancy **logits** ``(B, R, R, R)``; threshold at 0
    (:meth:`occupancy`) for a boolean grid.  ``save_pretrained(dir)`` /
    ``VoxelTokenizer.from_pretrained(dir)`` save and load it.
    """

    config_class = VoxelTokenizerConfig

    def __init__(self, cfg: VoxelTokenizerConfig):
        schedule = ScaleSchedule.square(cfg.sides, rank=3)
        quantizer = make_quantizer(cfg.quantizer, cfg.latent_dim, GridPyramid(schedule), vocab_size=cfg.vocab_size,
                                   share_phi=cfg.share_phi, phi_ratio=cfg.phi_ratio, beta=cfg.beta)
        super().__init__(VoxelEncoder(cfg), VoxelDecoder(cfg), quantizer)
        self.cfg = self.config = cfg
        self.resolution = cfg.resolution

    def check_data(self, data: torch.Tensor) -> None:
        R = self.resolution
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"voxel data must be a torch.Tensor (B, {R}, {R}, {R}), got {type(data).__name__}")
        if data.dim() != 4 or tuple(data.shape[1:]) != (R, R, R):
            raise ValueError(f"voxel data: expected occupancy of shape (B, {R}, {R}, {R}), got {tuple(data.shape)}")
        if not (data.dtype == torch.bool or data.dtype.is_floating_point):
            raise TypeError(f"voxel data: expected a bool or float occupancy tensor, got dtype {data.dtype}")
        if data.dtype != torch.bool and data.numel() and (float(data.min()) < 0 or float(data.max()) > 1):
            raise ValueError(f"voxel data: occupancy values must lie in [0, 1], got [{float(data.min())}, {float(data.max())}]")

    @staticmethod
    def occupancy(logits: torch.Tensor) -> torch.Tensor:
        """Logits -> bool occupancy (probability > 0.5)."""
        return logits > 0


def build_voxel_tokenizer(cfg: VoxelTokenizerConfig | None = None, **overrides) -> VoxelTokenizer:
    """``build_voxel_tokenizer(resolution=16, latent_side=4, vocab_size=256)`` etc."""
    if cfg is None:
        cfg = VoxelTokenizerConfig(**overrides)
    elif overrides:
        cfg = VoxelTokenizerConfig(**{**cfg.to_dict(), **overrides})
    return VoxelTokenizer(cfg)


def occupancy_loss(logits: torch.Tensor, target: torch.Tensor, pos_weight: float = 2.0) -> torch.Tensor:
    """Reconstruction loss of occupancy logits ``(B, R, R, R)`` against a {0, 1} target:
    binary cross-entropy with occupied voxels up-weighted (shapes fill ~5% of the grid,
    so plain BCE under-predicts thin parts)."""
    pw = torch.tensor(pos_weight, device=logits.device, dtype=logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target.float(), pos_weight=pw)


# ---------------------------------------------------------------------------- completion masks
def known_token_masks(voxel_mask: torch.Tensor, schedule: ScaleSchedule, tol: float = 1e-6) -> list[torch.Tensor]:
    """Per-scale known-token masks from a known-voxel mask ``(B, R, R, R)`` bool -> list of ``(B, n_k)`` bool.

    A token is known when every voxel of its support is known. The support of a
    scale-k token is the block of voxels its area restriction averages, so the
    test is: area-pool the mask to the scale's grid and keep cells that pool to 1.
    """
    if voxel_mask.dim() != 4:
        raise ValueError(f"voxel_mask: expected (B, R, R, R), got {tuple(voxel_mask.shape)}")
    m = voxel_mask.float().unsqueeze(1)
    out = []
    for k in range(len(schedule)):
        pooled = F.interpolate(m, size=schedule.shape(k), mode="area")  # (B, 1, s, s, s)
        out.append((pooled >= 1 - tol).flatten(1))
    return out


def half_mask(batch: int, resolution: int, axis: int = 0, keep: str = "low") -> torch.Tensor:
    """Known-voxel mask ``(B, R, R, R)`` of one half of the grid along ``axis`` (0 = x, 1 = y, 2 = z)."""
    if axis not in (0, 1, 2) or keep not in ("low", "high"):
        raise ValueError(f"axis must be 0, 1 or 2 and keep 'low' or 'high', got {axis!r}, {keep!r}")
    idx = torch.arange(resolution)
    side = idx < resolution // 2 if keep == "low" else idx >= resolution // 2
    shape = [1, 1, 1]
    shape[axis] = resolution
    return side.view(*shape).expand(resolution, resolution, resolution).unsqueeze(0).expand(batch, -1, -1, -1).clone()
