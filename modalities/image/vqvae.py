"""VAR's multi-scale VQ-VAE for images, as an msar pyramid tokenizer.

A VQGAN-style CNN (channel multipliers 1,1,2,2,4 by default, two residual blocks
per level, self-attention at the lowest resolution and in the middle) maps an
image ``(B, 3, H, W)`` in [-1, 1] to a latent ``(B, Cvae, H/16, W/16)``; the
shared :class:`msar.MultiScaleResidualQuantizer` with a :class:`msar.GridPyramid`
(area down, bicubic up) turns it into K square token maps.  Module and
parameter names follow the reference implementation so released weights load
after the small renaming in :mod:`modalities.image.checkpoint`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from msar import GridPyramid, MultiScaleVQTokenizer, PretrainedMixin, ScaleSchedule, make_quantizer


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a residual connection."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v, scale=C ** -0.5)
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in VQGAN


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (res blocks), ``attn`` and an optional resampler."""


class Encoder(nn.Module):
    """``(B, in_channels, H, W) -> (B, z_channels, H / 2^(levels-1), W / 2^(levels-1))``."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 dropout: float = 0.0, in_channels: int = 3, z_channels: int = 32,
                 using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for i in range(self.num_resolutions):
            lvl = _Level()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
            for _ in range(num_res_blocks):
                lvl.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == self.num_resolutions - 1 and using_sa:
                    lvl.attn.append(AttnBlock(block_in))
            if i != self.num_resolutions - 1:
                lvl.downsample = Downsample2x(block_in)
            self.down.append(lvl)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, lvl in enumerate(self.down):
            for j, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[j](h)
            if i != self.num_resolutions - 1:
                h = lvl.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """``(B, z_channels, h, w) -> (B, out_channels, h * 2^(levels-1), w * 2^(levels-1))``."""

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 dropout: float = 0.0, in_channels: int = 3, z_channels: int = 32,
                 using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        self.num_resolutions = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in) if using_mid_sa else nn.Identity()
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.up = nn.ModuleList()
        for i in reversed(range(self.num_resolutions)):
            lvl = _Level()
            lvl.block, lvl.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):
                lvl.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == self.num_resolutions - 1 and using_sa:
                    lvl.attn.append(AttnBlock(block_in))
            if i != 0:
                lvl.upsample = Upsample2x(block_in)
            self.up.insert(0, lvl)  # index i <-> resolution level i, as in the reference
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for i in reversed(range(self.num_resolutions)):
            lvl = self.up[i]
            for j, block in enumerate(lvl.block):
                h = block(h)
                if len(lvl.attn) > 0:
                    h = lvl.attn[j](h)
            if i != 0:
                h = lvl.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class VQVAEConfig:
    """Architecture of the image tokenizer. Defaults are VAR's ``vae_ch160v4096z32``."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    dropout: float = 0.0
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    patch_nums: tuple = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    using_sa: bool = True
    using_mid_sa: bool = True
    # "vq" (VAR's codebook), "fsq" or "bitwise": the residual quantizer, same vocab_size (msar.make_quantizer)
    quantizer: str = "vq"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ch_mult"], d["patch_nums"] = list(self.ch_mult), list(self.patch_nums)
        return d


class VQVAE(PretrainedMixin, MultiScaleVQTokenizer):
    """The image pyramid tokenizer: images ``(B, C_img, H, W)`` in [-1, 1] <-> K square token maps."""

    config_class = VQVAEConfig  # save_pretrained / from_pretrained

    def __init__(self, cfg: VQVAEConfig | None = None, **overrides):
        cfg = cfg or VQVAEConfig()
        if overrides:
            cfg = VQVAEConfig(**{**asdict(cfg), **overrides})
        cfg.ch_mult, cfg.patch_nums = tuple(cfg.ch_mult), tuple(cfg.patch_nums)
        arch = dict(ch=cfg.ch, ch_mult=cfg.ch_mult, num_res_blocks=cfg.num_res_blocks, dropout=cfg.dropout,
                    in_channels=cfg.in_channels, z_channels=cfg.z_channels, using_sa=cfg.using_sa,
                    using_mid_sa=cfg.using_mid_sa)
        pyramid = GridPyramid(ScaleSchedule.square(cfg.patch_nums), up_mode="bicubic", down_mode="area")
        quantizer = make_quantizer(cfg.quantizer, cfg.z_channels, pyramid, vocab_size=cfg.vocab_size,
                                   share_phi=cfg.share_quant_resi, phi_ratio=cfg.quant_resi, beta=cfg.beta,
                                   **({"l2_norm": cfg.using_znorm} if cfg.quantizer == "vq" else {}))
        ks = cfg.quant_conv_ks
        super().__init__(Encoder(**arch), Decoder(**arch), quantizer,
                         quant_conv=nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2),
                         post_quant_conv=nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, 1, ks // 2))
        self.cfg = self.config = cfg

    def check_data(self, img: torch.Tensor) -> None:
        cfg = self.cfg
        if not isinstance(img, torch.Tensor) or not img.dtype.is_floating_point:
            raise TypeError(f"images: expected a float tensor (B, {cfg.in_channels}, H, W) in [-1, 1], got "
                            f"{type(img).__name__} {getattr(img, 'dtype', '')}")
        if img.dim() != 4 or img.shape[1] != cfg.in_channels:
            raise ValueError(f"images: expected shape (B, {cfg.in_channels}, H, W), got {tuple(img.shape)}")
        side = cfg.image_size
        if tuple(img.shape[2:]) != (side, side):
            raise ValueError(f"images: expected {side}x{side} pixels (last scale {cfg.patch_nums[-1]} x "
                             f"downsample {cfg.downsample}), got {img.shape[2]}x{img.shape[3]}")
        w = self.encoder.conv_in.weight
        if img.device != w.device:
            raise ValueError(f"images: on {img.device} but the tokenizer is on {w.device}")
        if img.dtype != w.dtype and not torch.is_autocast_enabled(img.device.type):
            raise TypeError(f"images: dtype {img.dtype} but the tokenizer's weights are {w.dtype} "
                            f"(convert with .to({w.dtype}) or run under torch.autocast)")

    # decoded images are clamped to the data range, as in VAR (training uses decode_latent unclamped)
    @torch.no_grad()
    def decode(self, indices) -> torch.Tensor:
        return super().decode(indices).clamp_(-1, 1)

    @torch.no_grad()
    def decode_progression(self, indices) -> list[torch.Tensor]:
        return [x.clamp_(-1, 1) for x in super().decode_progression(indices)]

    @torch.no_grad()
    def finish(self, state) -> torch.Tensor:
        return super().finish(state).clamp_(-1, 1)

    @torch.no_grad()
    def reconstruct(self, img: torch.Tensor) -> torch.Tensor:
        """Encode, quantize over all scales, decode: ``(B, C, H, W)`` clamped to [-1, 1]."""
        f = self.encode_latent(img)
        return self.decode_latent(self.quantizer.encode_progression(f)[-1]).clamp_(-1, 1)
