"""Space-time scale schedules and the latent pyramids that drive the core quantizer.

A video latent is ``(B, C, T, H, W)`` (channels first, as the core expects).  The
field builds next-scale pyramids over it in three ways, all expressed here as a
:class:`msar.ScaleSchedule` of rank-3 ``(t, h, w)`` grids:

* **joint** -- time grows with the scale like space does: ``(1,1,1), (1,2,2),
  (2,4,4), ..., (T,H,W)``; a :class:`msar.GridPyramid` (trilinear) moves the
  latent between scales.  Coarse tokens summarise several latent frames.
* **space-only** -- every scale keeps all ``T`` latent frames: ``(T,1,1), (T,2,2),
  ..., (T,H,W)`` (InfinityStar's clips); also a :class:`msar.GridPyramid`.
* **per-frame** -- one spatial pyramid per latent frame, the pyramids laid out frame
  after frame: ``(1,1,1)@0, (1,2,2)@0, ..., (1,H,W)@0, (1,1,1)@1, ...``.  The core's
  block-causal mask then makes frame t see only frames <= t (frame causality for
  free).  Scale k touches only its own frame, which a grid pyramid cannot say, so
  :class:`FramePyramid` implements ``restrict`` / ``prolong`` for it and tells the
  core the full latent shape ``(T, H, W)`` through its ``full`` attribute (the last
  scale alone is one frame's ``(1, H, W)``).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F

from msar import GridPyramid, ScaleSchedule

Side = Union[int, Sequence[int]]

SCHEDULE_KINDS = ("joint", "space", "frame")
# what a per-frame pyramid's scales quantize: each frame from scratch, or its change from the previous one
FRAME_CODINGS = ("intra", "delta")
FRAME_INPUTS = ("own", "previous")


# ---------------------------------------------------------------------------- argument checks
def _check_latent_shape(latent_shape: Sequence[int]) -> tuple[int, int, int]:
    if not isinstance(latent_shape, (list, tuple)) or len(latent_shape) != 3:
        raise ValueError(f"latent_shape must be (T, H, W), got {latent_shape!r}")
    if any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in latent_shape):
        raise ValueError(f"latent_shape must hold three positive ints (T, H, W), got {latent_shape!r}")
    return tuple(latent_shape)  # type: ignore[return-value]


def _spatial_sides(sides: Sequence[Side] | None, H: int, W: int) -> list[tuple[int, int]]:
    """Normalise spatial sides (ints for square, or (h, w)); default VAR-like 1, 2, 4, ... up to (H, W)."""
    if sides is None:
        out, s = [], 1
        while s < max(H, W):
            out.append((min(s, H), min(s, W)))
            s *= 2
        out.append((H, W))
        return out
    if len(sides) == 0:
        raise ValueError("spatial sides must be a non-empty list")
    out = []
    for s in sides:
        hw = (s, s) if isinstance(s, int) and not isinstance(s, bool) else tuple(s)
        if len(hw) != 2 or any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in hw):
            raise ValueError(f"spatial sides must be positive ints or (h, w) pairs, got {s!r}")
        if hw[0] > H or hw[1] > W:
            raise ValueError(f"spatial side {hw} exceeds the latent's (H, W) = {(H, W)}")
        out.append(hw)
    for a, b in zip(out, out[1:]):
        if b[0] < a[0] or b[1] < a[1]:
            raise ValueError(f"spatial sides must not shrink from scale to scale, got {out}")
    if out[-1] != (H, W):
        raise ValueError(f"the last spatial side must be the latent's (H, W) = {(H, W)}, got {out[-1]}")
    return out


# ---------------------------------------------------------------------------- builders
def joint_schedule(latent_shape: Sequence[int], sides: Sequence[Side] | None = None,
                   time_sides: Sequence[int] | None = None) -> ScaleSchedule:
    """Joint space-time pyramid: ``t_k`` grows with the scale.

    Args:
        latent_shape: ``(T, H, W)`` of the finest latent.
        sides: spatial sides per scale (ints or ``(h, w)``); default 1, 2, 4, ..., H.
        time_sides: ``t_k`` per scale; default ``ceil(T * h_k / H)``, i.e. time
            coarsened in proportion to space (never below 1, ending at T).

    >>> joint_schedule((3, 8, 8), [1, 2, 4, 8]).scales
    ((1, 1, 1), (1, 2, 2), (2, 4, 4), (3, 8, 8))
    """
    T, H, W = _check_latent_shape(latent_shape)
    hw = _spatial_sides(sides, H, W)
    if time_sides is None:
        ts = [max(1, min(T, math.ceil(T * h / H))) for h, _ in hw]
    else:
        ts = [int(t) for t in time_sides]
        if len(ts) != len(hw):
            raise ValueError(f"time_sides has {len(ts)} entries but there are {len(hw)} spatial scales")
        if any(t <= 0 or t > T for t in ts) or any(b < a for a, b in zip(ts, ts[1:])):
            raise ValueError(f"time_sides must be non-decreasing in [1, {T}], got {ts}")
    if ts[-1] != T:
        raise ValueError(f"the last time side must be T = {T}, got {ts[-1]}")
    return ScaleSchedule([(t, h, w) for t, (h, w) in zip(ts, hw)])


def space_schedule(latent_shape: Sequence[int], sides: Sequence[Side] | None = None) -> ScaleSchedule:
    """Space-only pyramid: every scale holds all T latent frames, ``(T, h_k, w_k)``.

    >>> space_schedule((3, 8, 8), [1, 4, 8]).token_counts
    [3, 48, 192]
    """
    T, H, W = _check_latent_shape(latent_shape)
    return ScaleSchedule([(T, h, w) for h, w in _spatial_sides(sides, H, W)])


class FrameScaleSchedule(ScaleSchedule):
    """Per-frame spatial pyramids laid out frame after frame (see the module docstring).

    ``frame_of[k]`` is the latent frame of scale k; ``spatial[k]`` its ``(h, w)``;
    ``full_shape`` is ``(T, H, W)``; ``shape(k)`` is the ``(1, h_k, w_k)`` grid of scale k
    (so ``shape(-1)`` is the last frame's finest grid, like any schedule).
    """

    def __init__(self, latent_shape: Sequence[int], sides: Sequence[Side] | None = None):
        if isinstance(latent_shape, FrameScaleSchedule):  # copy-construct
            latent_shape, sides = latent_shape.full_shape, latent_shape.frame_sides
        T, H, W = _check_latent_shape(latent_shape)
        hw = _spatial_sides(sides, H, W)
        super().__init__([(1, h, w) for _ in range(T) for h, w in hw])
        self.full_shape: tuple[int, int, int] = (T, H, W)
        self.frame_sides: list[tuple[int, int]] = hw
        self.scales_per_frame = len(hw)
        self.frame_of: list[int] = [t for t in range(T) for _ in hw]
        self.spatial: list[tuple[int, int]] = [s for _ in range(T) for s in hw]

    def to_dict(self) -> dict:
        """Typed JSON form (see :meth:`msar.ScaleSchedule.to_dict`): the constructor's arguments."""
        return {**super().to_dict(), "latent_shape": list(self.full_shape), "sides": [list(s) for s in self.frame_sides]}

    @classmethod
    def _from_dict(cls, d: dict) -> "FrameScaleSchedule":
        return cls(tuple(d["latent_shape"]), [tuple(s) for s in d["sides"]])

    def progress(self, k: int) -> float:
        """Scale k's place in its own frame's pyramid, 0 (coarsest) to 1 (finest): samplers that ramp
        with the scale (VAR's linear guidance) restart the ramp with every frame instead of barely
        guiding the first frames and fully guiding the last."""
        if not 0 <= k < self.num_scales:
            raise IndexError(f"scale {k} out of range for a schedule of {self.num_scales} scales")
        n = self.scales_per_frame
        return (k - self.first_scale_of(self.frame_of[k])) / (n - 1) if n > 1 else 1.0

    def coordinates(self, k: int) -> torch.Tensor:
        """``(n_k, 3)`` cell centres ``(t, y, x)`` in ``[0, 1]``: scale k's ``(1, h, w)`` grid covers
        latent frame ``frame_of[k]`` only, so its time coordinate is that frame's centre
        ``(t + 0.5) / T`` (the same place in two frames differs only in ``t``)."""
        c = super().coordinates(k)
        c[:, 0] = (self.frame_of[k] + 0.5) / self.full_shape[0]
        return c

    def first_scale_of(self, t: int) -> int:
        """Index of the first (1x1-ish) scale of latent frame t."""
        return t * self.scales_per_frame

    def __repr__(self) -> str:
        return f"FrameScaleSchedule(full={self.full_shape}, sides={self.frame_sides})"


def frame_schedule(latent_shape: Sequence[int], sides: Sequence[Side] | None = None) -> FrameScaleSchedule:
    """Per-frame pyramids with frame-to-frame causality.

    >>> s = frame_schedule((2, 4, 4), [1, 2, 4])
    >>> s.token_counts, s.frame_of
    ([1, 4, 16, 1, 4, 16], [0, 0, 0, 1, 1, 1])
    """
    return FrameScaleSchedule(latent_shape, sides)


def build_schedule(kind: str, latent_shape: Sequence[int], sides: Sequence[Side] | None = None) -> ScaleSchedule:
    """``kind`` in ``("joint", "space", "frame")``."""
    if kind == "joint":
        return joint_schedule(latent_shape, sides)
    if kind == "space":
        return space_schedule(latent_shape, sides)
    if kind == "frame":
        return frame_schedule(latent_shape, sides)
    raise ValueError(f"schedule kind must be one of {SCHEDULE_KINDS}, got {kind!r}")


# ---------------------------------------------------------------------------- pyramids
class FramePyramid:
    """Restriction / prolongation for a :class:`FrameScaleSchedule`.

    Scale k lives in latent frame ``t = frame_of[k]`` only:
    ``restrict(f, k)`` area-pools frame t of ``f`` ``(B, C, T, H, W)`` to ``(B, C, 1, h_k, w_k)``;
    ``prolong(h, k)`` upsamples bicubically back to ``(H, W)`` and places it in frame t
    (zeros elsewhere), so the residual of other frames is untouched.

    ``frame_coding`` says what frame t's scales quantize:

    * ``"intra"``: frame t from scratch.  ``prolong`` writes frame t only, and
      ``resample(f_hat, k)`` (the transformer input of scale k) pools frame t's latent
      accumulated so far -- except at the first scale of a frame t > 0, where frame t is
      still empty: there it pools the finished previous frame, a "nothing moved" guess.
      The transformer never sees a finished frame at full resolution (the input of a
      frame's finest scale holds only its coarser scales): the previous frame's finest
      detail reaches the next frame only through the tokens' embeddings.
    * ``"delta"`` (predictive coding, like a video codec's P-frames): ``prolong`` writes
      scale k's code map into frame t *and every later frame*, so each frame starts
      from the reconstruction of the one before and its scales quantize the change
      ``f_t - f_hat_{t-1}``.  Quantization stays closed-loop (frame t's residual also
      corrects frame t-1's error, so errors do not build up), and ``resample`` is a plain
      pool of frame t: the input of every scale of frame t is the full-resolution
      previous frame plus the change drawn so far.  The latent is still the sum of the
      scales' prolongations, so encoding, decoding and teacher forcing are the core's.
      Prolongation stays causal (scale k writes frames ``>= t`` only).

    ``frame_input`` says what the transformer input of an intra-coded frame t > 0 shows (the
    codes, and so encoding and decoding, are the same either way):

    * ``"own"``: frame t's latent accumulated so far (the previous frame at its first scale only).
    * ``"previous"``: the finished previous frame with its coarse content replaced by frame t's
      scales drawn so far, ``f_hat_t + f_hat_{t-1} - up(pool(f_hat_{t-1}, s_{k-1}))`` pooled to
      scale k, i.e. "frame t-1's finer detail has not moved".  Every scale of frame t then sees
      the finished previous frame down to its finest detail, which the ``"own"`` input never
      shows, while the quantized content stays intra (the ``"delta"`` input with intra codes).
    """

    def __init__(self, schedule: FrameScaleSchedule, up_mode: str = "bicubic", frame_coding: str = "intra",
                 frame_input: str = "own"):
        if not isinstance(schedule, FrameScaleSchedule):
            raise TypeError(f"FramePyramid needs a FrameScaleSchedule (see frame_schedule), got {type(schedule).__name__}")
        if frame_coding not in FRAME_CODINGS:
            raise ValueError(f"frame_coding must be one of {FRAME_CODINGS}, got {frame_coding!r}")
        if frame_input not in FRAME_INPUTS:
            raise ValueError(f"frame_input must be one of {FRAME_INPUTS}, got {frame_input!r}")
        if frame_input == "previous" and frame_coding != "intra":
            raise ValueError("frame_input='previous' is for intra coding: with frame_coding='delta' every scale's "
                             "input already holds the finished previous frame")
        self.schedule = schedule
        self.full = schedule.full_shape
        self.up_mode = up_mode
        self.frame_coding = frame_coding
        self.frame_input = frame_input

    def _check(self, x: torch.Tensor, shape: Sequence[int], what: str) -> None:
        if x.dim() != 5 or tuple(x.shape[2:]) != tuple(shape):
            raise ValueError(f"{what}: expected a latent (B, C, {', '.join(map(str, shape))}), got {tuple(x.shape)}")

    def _pool(self, frame: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        # frame: (B, C, H, W) -> (B, C, 1, h, w)
        if tuple(frame.shape[-2:]) != hw:
            frame = F.interpolate(frame, size=hw, mode="area")
        return frame.unsqueeze(2)

    def restrict(self, f: torch.Tensor, k: int) -> torch.Tensor:
        self._check(f, self.full, "restrict")
        s = self.schedule
        return self._pool(f[:, :, s.frame_of[k]], s.spatial[k])

    def resample(self, f: torch.Tensor, k: int) -> torch.Tensor:
        self._check(f, self.full, "resample")
        s = self.schedule
        t = s.frame_of[k]
        if self.frame_coding == "intra" and t > 0:
            if k == s.first_scale_of(t):  # frame t is still empty: show the finished previous frame
                return self._pool(f[:, :, t - 1], s.spatial[k])
            if self.frame_input == "previous":  # frame t's coarse content + frame t-1's finer detail
                prev = f[:, :, t - 1]
                low = prev if tuple(s.spatial[k - 1]) == tuple(self.full[1:]) else F.interpolate(
                    F.interpolate(prev, size=s.spatial[k - 1], mode="area"), size=self.full[1:], mode=self.up_mode)
                return self._pool(f[:, :, t] + (prev - low), s.spatial[k])
        return self._pool(f[:, :, t], s.spatial[k])

    def prolong(self, h: torch.Tensor, k: int) -> torch.Tensor:
        s = self.schedule
        self._check(h, s.shape(k), "prolong")
        T, H, W = self.full
        frame = h[:, :, 0]
        if tuple(frame.shape[-2:]) != (H, W):
            frame = F.interpolate(frame, size=(H, W), mode=self.up_mode)
        out = h.new_zeros(h.shape[0], h.shape[1], T, H, W)
        t = s.frame_of[k]
        if self.frame_coding == "delta":  # frames > t start from this frame's reconstruction
            out[:, :, t:] = frame.unsqueeze(2)
        else:
            out[:, :, t] = frame
        return out


def make_pyramid(schedule: ScaleSchedule, frame_coding: str = "intra", frame_input: str = "own"):
    """The latent pyramid for a video schedule: :class:`FramePyramid` for per-frame
    schedules (``frame_coding``: ``"intra"`` or ``"delta"``; ``frame_input``: ``"own"`` or
    ``"previous"``; see there), :class:`msar.GridPyramid` (area down, trilinear up) otherwise."""
    if isinstance(schedule, FrameScaleSchedule):
        return FramePyramid(schedule, frame_coding=frame_coding, frame_input=frame_input)
    if frame_coding != "intra" or frame_input != "own":
        raise ValueError(f"frame_coding={frame_coding!r} / frame_input={frame_input!r} need the per-frame schedule "
                         f"('frame'), got {schedule}")
    if schedule.rank != 3 or any(not schedule.is_grid(k) for k in range(len(schedule))):
        raise ValueError(f"a video schedule needs rank-3 (t, h, w) grid scales, got {schedule}")
    return GridPyramid(schedule)
