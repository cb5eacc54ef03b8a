"""A small causal 3-D convolutional multi-scale VQ-VAE for video.

Videos are ``(B, C, T, H, W)`` floats in ``[-1, 1]``.  The encoder maps them to a
latent ``(B, D, T', H', W')`` with ``T' = 1 + (T - 1) / time_stride`` and
``H' = H / space_stride``: as in current causal video tokenizers (MAGVIT-v2,
CogVideoX, Cosmos) the first frame is encoded on its own and every later latent
frame covers ``time_stride`` new frames, so ``T`` must be ``1 + time_stride * n``.

Causality in time holds everywhere: convolutions pad only the past (replicating
the first frame), normalisation is per frame, and the decoder upsamples time
causally.  Latent frame t therefore depends only on frames ``<= t * time_stride``,
and decoded frames of group t depend only on latent frames ``<= t``.  Together
with the per-frame pyramid (:class:`~modalities.video.schedules.FramePyramid`) this
makes frame prediction truly causal: given frames are reproduced exactly.

The quantizer is the core's (:func:`msar.make_quantizer`: VQ by default, FSQ or bitwise); only the
pyramid (joint / space-only / per-frame, see :mod:`modalities.video.schedules`)
is video-specific.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from msar import MultiScaleVQTokenizer, PretrainedMixin, make_quantizer

from .schedules import FRAME_CODINGS, FRAME_INPUTS, FrameScaleSchedule, build_schedule, make_pyramid


# ---------------------------------------------------------------------------- causal building blocks
class CausalConv3d(nn.Module):
    """3-D convolution that pads time only on the past (with copies of the first frame).

    With temporal kernel ``kt`` and stride ``st`` the output has ``(T - 1) // st + 1``
    frames and output frame i sees input frames ``<= i * st``; output frame 0 sees
    frame 0 alone.  Space is zero-padded symmetrically ("same").
    """

    def __init__(self, cin: int, cout: int, kernel: Sequence[int] = (3, 3, 3), stride: Sequence[int] = (1, 1, 1)):
        super().__init__()
        kt, kh, kw = kernel
        self.kt = kt
        self.conv = nn.Conv3d(cin, cout, tuple(kernel), tuple(stride), padding=(0, kh // 2, kw // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kt > 1:
            x = torch.cat((x[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1), x), dim=2)
        return self.conv(x)


class FrameNorm(nn.GroupNorm):
    """GroupNorm computed per frame: a 3-D GroupNorm would pool statistics over time and
    leak the future into the past."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        y = super().forward(x.transpose(1, 2).reshape(B * T, C, H, W))
        return y.view(B, T, C, H, W).transpose(1, 2)


def _norm(c: int) -> FrameNorm:
    return FrameNorm(num_groups=min(8, c), num_channels=c, eps=1e-6)


class ResBlock3d(nn.Module):
    """``x + conv(silu(norm(conv(silu(norm(x))))))`` with causal 3x3x3 convs."""

    def __init__(self, cin: int, cout: int | None = None):
        super().__init__()
        cout = cout or cin
        self.net = nn.Sequential(_norm(cin), nn.SiLU(), CausalConv3d(cin, cout),
                                 _norm(cout), nn.SiLU(), CausalConv3d(cout, cout))
        self.skip = nn.Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.net(x)


class CausalUpsample(nn.Module):
    """Upsampling ``x (st in time, 2 in space)`` that keeps the first latent frame as a single
    frame (it encodes frame 0 alone), then a causal conv.

    ``time_upsample="depth"`` (default): the ``st`` frames of a latent frame get their own
    features, ``repeat(x) + to_time(x)`` where ``to_time`` is a spatial conv to ``st * C``
    channels, one block per frame of the group (depth-to-time, as pixel shuffle does in space).
    ``"repeat"``: nearest repetition only.  With repetition, a stage whose conv does not mix
    time (the full-resolution one is spatial-only for CPU cost) outputs ``st`` identical
    frames: the digit stands still inside a group and jumps to the next.  Either way frames
    of group t depend only on latent frames ``<= t``.
    """

    def __init__(self, cin: int, cout: int, time_factor: int, kernel: Sequence[int] = (3, 3, 3),
                 time_upsample: str = "depth"):
        super().__init__()
        if time_upsample not in ("depth", "repeat"):
            raise ValueError(f"time_upsample must be 'depth' or 'repeat', got {time_upsample!r}")
        self.time_factor = time_factor
        self.to_time = (CausalConv3d(cin, cin * time_factor, kernel=(1, 3, 3))
                        if time_upsample == "depth" and time_factor > 1 else None)
        self.conv = CausalConv3d(cin, cout, kernel=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.time_factor
        if st > 1 and x.shape[2] > 1:
            rep = torch.cat((x[:, :, :1], x[:, :, 1:].repeat_interleave(st, dim=2)), dim=2)
            if self.to_time is not None:
                B, C, T, H, W = x.shape
                y = self.to_time(x)  # (B, st * C, T, H, W): channel block j = frame j of the group
                rest = y[:, :, 1:].view(B, st, C, T - 1, H, W).permute(0, 2, 3, 1, 4, 5).reshape(B, C, (T - 1) * st, H, W)
                rep = rep + torch.cat((y[:, :C, :1], rest), dim=2)
            x = rep
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x)


TIME_STAGES = ("fine", "coarse")


def _stage_time_strides(time_stride: int, space_stride: int, time_stages: str = "fine") -> list[int]:
    """The encoder's time stride per spatial down stage, finest stage first: the factors of 2 go to
    the finest stages (``"fine"``) or to the coarsest (``"coarse"``); the decoder mirrors it."""
    n_stages = int(round(math.log2(space_stride)))
    n_time = int(round(math.log2(time_stride)))
    strides = [2 if i < n_time else 1 for i in range(n_stages)]
    return strides if time_stages == "fine" else strides[::-1]


class VideoEncoder(nn.Module):
    """``(B, C_in, T, H, W) -> (B, D, T', H', W')``.

    conv_in (1x3x3) -> [causal down conv (stride st, 2, 2), norm, SiLU] per stage -> ResBlock
    -> norm/SiLU/conv_out.

    ``coord_input=True`` appends two channels holding every pixel's (y, x) in [-1, 1] to the
    input.  Convolutions are translation-equivariant, so without them a frame's spatial mean
    latent (what the coarsest scale quantizes) says almost nothing about *where* things are.
    """

    def __init__(self, in_channels: int, channels: Sequence[int], latent_dim: int, time_stride: int, space_stride: int,
                 coord_input: bool = False, time_stages: str = "fine"):
        super().__init__()
        self.coord_input = coord_input
        in_channels = in_channels + 2 * coord_input
        strides = _stage_time_strides(time_stride, space_stride, time_stages)
        if len(channels) != len(strides) + 1:
            raise ValueError(f"channels needs {len(strides) + 1} entries for space_stride {space_stride}, got {list(channels)}")
        # full resolution: a spatial-only conv (the costly resolution on CPU); time is mixed
        # by the strided causal convs and the ResBlock at the latent resolution
        self.conv_in = CausalConv3d(in_channels, channels[0], kernel=(1, 3, 3))
        stages = []
        for i, st in enumerate(strides):
            stages += [CausalConv3d(channels[i], channels[i + 1], stride=(st, 2, 2)), _norm(channels[i + 1]), nn.SiLU()]
        stages.append(ResBlock3d(channels[-1]))
        self.stages = nn.Sequential(*stages)
        self.out = nn.Sequential(_norm(channels[-1]), nn.SiLU(), CausalConv3d(channels[-1], latent_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.coord_input:
            B, _, T, H, W = x.shape
            ys = torch.linspace(-1, 1, H, device=x.device, dtype=x.dtype).view(1, 1, 1, H, 1).expand(B, 1, T, H, W)
            xs = torch.linspace(-1, 1, W, device=x.device, dtype=x.dtype).view(1, 1, 1, 1, W).expand(B, 1, T, H, W)
            x = torch.cat([x, ys, xs], dim=1)
        return self.out(self.stages(self.conv_in(x)))


class VideoDecoder(nn.Module):
    """``(B, D, T', H', W') -> (B, C_in, T, H, W)``, the mirror of :class:`VideoEncoder`."""

    def __init__(self, in_channels: int, channels: Sequence[int], latent_dim: int, time_stride: int, space_stride: int,
                 time_upsample: str = "depth", time_stages: str = "fine"):
        super().__init__()
        strides = _stage_time_strides(time_stride, space_stride, time_stages)[::-1]
        ch = list(channels)[::-1]
        self.conv_in = nn.Sequential(CausalConv3d(latent_dim, ch[0]), ResBlock3d(ch[0]))
        stages = []
        for i, st in enumerate(strides):
            last = i == len(strides) - 1  # the full-resolution conv is spatial-only (CPU cost)
            stages.append(CausalUpsample(ch[i], ch[i + 1], st, kernel=(1, 3, 3) if last else (3, 3, 3),
                                         time_upsample=time_upsample))
            if not last:
                stages += [_norm(ch[i + 1]), nn.SiLU()]
        self.stages = nn.Sequential(*stages)
        self.out = nn.Sequential(_norm(ch[-1]), nn.SiLU(), CausalConv3d(ch[-1], in_channels, kernel=(1, 3, 3)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.stages(self.conv_in(z)))


# ---------------------------------------------------------------------------- config and tokenizer
@dataclass
class VideoTokenizerConfig:
    """Hyper-parameters of :class:`VideoTokenizer`.

    ``frames`` must be ``1 + time_stride * n`` (first frame on its own);
    ``height`` / ``width`` multiples of ``space_stride`` (a power of two);
    ``schedule`` one of ``"joint"``, ``"space"``, ``"frame"``; ``sides`` the spatial
    sides of the pyramid (default 1, 2, 4, ... up to the latent side).
    """

    frames: int = 9
    height: int = 32
    width: int = 32
    in_channels: int = 1
    channels: tuple = (16, 32, 64)
    latent_dim: int = 32
    vocab_size: int = 512
    time_stride: int = 4
    space_stride: int = 4
    schedule: str = "joint"
    sides: list | None = None
    share_phi: int = 4
    phi_ratio: float = 0.5
    beta: float = 0.25
    # "vq", "fsq" or "bitwise": the residual quantizer, same vocab_size (msar.make_quantizer)
    quantizer: str = "vq"
    # how the decoder upsamples time: "depth" (every frame of a group its own features) or
    # "repeat" (nearest; frames of a group come out nearly identical, see CausalUpsample)
    time_upsample: str = "depth"
    # which stages resample time: "fine" (the encoder's first, full-resolution ones; the decoder
    # upsamples time last, where its convs are spatial-only) or "coarse" (the encoder's last; the
    # decoder upsamples time first, so every frame of a group passes through its space-time convs)
    time_stages: str = "fine"
    # per-frame schedule only: "intra" (every frame quantized from scratch) or "delta" (each frame
    # quantized as its change from the previous frame's reconstruction; see FramePyramid)
    frame_coding: str = "intra"
    # per-frame intra schedule only: what the transformer input of frame t > 0 shows, "own" (the
    # frame's coarse scales so far) or "previous" (plus the finished previous frame's finer detail;
    # see FramePyramid). Only the transformer's input changes: the codes are the same.
    frame_input: str = "own"
    # the encoder also sees every pixel's (y, x) (VideoEncoder.coord_input)
    coord_input: bool = False
    # > 0: a linear head from every latent frame's spatial mean (what a frame's coarsest scale
    # quantizes) to a layout_side x layout_side thumbnail of the group's last frame, trained by
    # VideoTokenizer.layout_loss; it makes the coarsest token say where the content is
    layout_side: int = 0

    def __post_init__(self) -> None:
        for name in ("frames", "height", "width", "in_channels", "latent_dim", "vocab_size", "time_stride", "space_stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"VideoTokenizerConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.coord_input, bool):
            raise ValueError(f"VideoTokenizerConfig.coord_input must be True or False, got {self.coord_input!r}")
        if isinstance(self.layout_side, bool) or not isinstance(self.layout_side, int) or self.layout_side < 0:
            raise ValueError(f"VideoTokenizerConfig.layout_side must be an int >= 0, got {self.layout_side!r}")
        if self.layout_side > min(self.height, self.width):
            raise ValueError(f"VideoTokenizerConfig.layout_side ({self.layout_side}) may not exceed the frame side "
                             f"{min(self.height, self.width)}")
        for name in ("time_stride", "space_stride"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"VideoTokenizerConfig.{name} must be a power of two, got {v}")
        if self.time_stride > self.space_stride:
            raise ValueError(f"time_stride ({self.time_stride}) may not exceed space_stride ({self.space_stride}): "
                             "time is downsampled inside the spatial stages")
        if (self.frames - 1) % self.time_stride:
            raise ValueError(f"frames must be 1 + time_stride * n (the first frame is encoded on its own); "
                             f"got frames={self.frames}, time_stride={self.time_stride}")
        if self.height % self.space_stride or self.width % self.space_stride:
            raise ValueError(f"height and width must be multiples of space_stride={self.space_stride}, "
                             f"got {self.height}x{self.width}")
        if self.time_upsample not in ("depth", "repeat"):
            raise ValueError(f"VideoTokenizerConfig.time_upsample must be 'depth' or 'repeat', got {self.time_upsample!r}")
        if self.time_stages not in TIME_STAGES:
            raise ValueError(f"VideoTokenizerConfig.time_stages must be one of {TIME_STAGES}, got {self.time_stages!r}")
        if self.frame_coding not in FRAME_CODINGS:
            raise ValueError(f"VideoTokenizerConfig.frame_coding must be one of {FRAME_CODINGS}, got {self.frame_coding!r}")
        if self.frame_coding == "delta" and self.schedule != "frame":
            raise ValueError(f"frame_coding='delta' codes each frame against the previous one and needs "
                             f"schedule='frame', got schedule={self.schedule!r}")
        if self.frame_input not in FRAME_INPUTS:
            raise ValueError(f"VideoTokenizerConfig.frame_input must be one of {FRAME_INPUTS}, got {self.frame_input!r}")
        if self.frame_input == "previous" and (self.schedule != "frame" or self.frame_coding != "intra"):
            raise ValueError(f"frame_input='previous' needs schedule='frame' with frame_coding='intra', got "
                             f"schedule={self.schedule!r}, frame_coding={self.frame_coding!r}")
        self.channels = tuple(int(c) for c in self.channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(T', H', W')``."""
        return (1 + (self.frames - 1) // self.time_stride, self.height // self.space_stride,
                self.width // self.space_stride)


class VideoTokenizer(PretrainedMixin, MultiScaleVQTokenizer):
    """Causal 3-D conv VQ-VAE + the core multi-scale residual quantizer over a space-time pyramid.

    ``encode(video (B, C, T, H, W)) -> list[(B, n_k) long]``; ``decode`` inverts it.
    Build with :func:`build_video_tokenizer` (or ``VideoTokenizer(config)``); save with
    ``tok.save_pretrained(dir)``, load with ``VideoTokenizer.from_pretrained(dir)``.
    """

    config_class = VideoTokenizerConfig

    def __init__(self, config: VideoTokenizerConfig):
        c = config
        schedule = build_schedule(c.schedule, c.latent_shape, c.sides)
        pyramid = make_pyramid(schedule, c.frame_coding, c.frame_input)
        # per-frame pyramids: a 3x3x3 phi would smear a frame's codes into its neighbours
        # (and into the past), breaking frame causality, so phi is spatial-only there
        phi_kernel = (1, 3, 3) if isinstance(schedule, FrameScaleSchedule) else 3
        quantizer = make_quantizer(c.quantizer, c.latent_dim, pyramid, vocab_size=c.vocab_size, share_phi=c.share_phi,
                                   phi_ratio=c.phi_ratio, beta=c.beta, phi_kernel=phi_kernel)
        super().__init__(
            VideoEncoder(c.in_channels, c.channels, c.latent_dim, c.time_stride, c.space_stride, c.coord_input,
                         c.time_stages),
            VideoDecoder(c.in_channels, c.channels, c.latent_dim, c.time_stride, c.space_stride, c.time_upsample,
                         c.time_stages),
            quantizer,
        )
        self.config = config
        self.layout_head = (nn.Linear(c.latent_dim, c.in_channels * c.layout_side ** 2) if c.layout_side else None)

    def with_frame_input(self, frame_input: str) -> "VideoTokenizer":
        """A copy of this tokenizer (same weights, same codes) whose transformer input is ``frame_input``
        (``"own"`` or ``"previous"``, see :class:`~modalities.video.schedules.FramePyramid`): the input is
        a view of the codes, so a trained tokenizer serves either kind of transformer."""
        tok = type(self)(replace(self.config, frame_input=frame_input))
        tok.load_state_dict(self.state_dict())
        return tok.train(self.training)

    def layout_loss(self, data: torch.Tensor) -> torch.Tensor:
        """MSE of the layout head's thumbnails against the real ones (needs ``layout_side > 0``).

        ``data`` ``(B, C, T, H, W)``.  Latent frame t's spatial mean ``(B, D)`` is mapped to an
        ``(C, s, s)`` thumbnail (area average) of frame ``t * time_stride``, the last frame the
        latent frame covers: the coarsest token of frame t then has to carry where the content of
        that frame is, so a sampler commits to a position (and so a velocity) with one token
        instead of with the several tokens of the next scales, drawn independently.
        """
        c = self.config
        if self.layout_head is None:
            raise ValueError("layout_loss needs a tokenizer built with layout_side > 0")
        mean = self.encode_latent(data).mean(dim=(3, 4)).transpose(1, 2)  # (B, T', D)
        last = data[:, :, ::c.time_stride]  # (B, C, T', H, W): frame 0, then each group's last frame
        B, C, T, H, W = last.shape
        thumbs = F.adaptive_avg_pool2d(last.transpose(1, 2).reshape(B * T, C, H, W), c.layout_side)
        return F.mse_loss(self.layout_head(mean).reshape(B * T, C, c.layout_side, c.layout_side), thumbs)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.config.latent_shape

    def check_data(self, data: torch.Tensor) -> None:
        c = self.config
        want = (c.in_channels, c.frames, c.height, c.width)
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"video: expected a float tensor (B, {', '.join(map(str, want))}), got {type(data).__name__}")
        if not data.dtype.is_floating_point:
            raise TypeError(f"video: expected a floating point tensor in [-1, 1], got dtype {data.dtype}")
        if data.dim() != 5 or tuple(data.shape[1:]) != want:
            raise ValueError(f"video: expected shape (B, C={c.in_channels}, T={c.frames}, H={c.height}, W={c.width}), "
                             f"got {tuple(data.shape)}")


def build_video_tokenizer(**kwargs) -> VideoTokenizer:
    """``build_video_tokenizer(frames=9, schedule="frame", ...)``: see :class:`VideoTokenizerConfig`."""
    return VideoTokenizer(VideoTokenizerConfig(**kwargs))
