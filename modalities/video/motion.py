"""Motion as a condition: generate a video of a given class *moving at a given velocity*.

A class-conditional model has to decide a video's motion itself, and on moving digits the
decision is made by a few coarse tokens of the first generated frame, drawn independently of
each other: the samples come out slower than the data and their direction wobbles.  Telling the
model the motion removes that decision from the token draw, as Stable Video Diffusion's motion
micro-conditioning does (its "motion bucket" and frame rate go in next to the image).  At
sampling time the velocity is either chosen by the user or drawn from the training set's
velocities (:func:`draw_velocities`), the way graph generators draw node counts.

The condition is one float vector per video (``msar.Condition.vector``, a model with
``cond_kind="vector"`` and ``cond_dim=motion_condition_dim(num_classes)``)::

    [ one-hot class (num_classes) | v_y / max_speed, v_x / max_speed | motion given (0 or 1) ]

Rows whose motion is not given carry zeros and a 0 flag: a model trained with the motion left
out of some videos (``motion_features(..., given=mask)``) also generates class-only, and every
edit whose given frames already fix the motion (frame prediction) runs without it.
"""
from __future__ import annotations


import numpy as np
import torch

import msar
from .metrics import centroids


def motion_condition_dim(num_classes: int) -> int:
    """Feature size D of :func:`motion_features`: the one-hot class, (v_y, v_x) and the flag."""
    return num_classes + 3


def motion_features(labels: torch.Tensor, velocities: torch.Tensor | None = None, *, num_classes: int,
                    max_speed: float, given: torch.Tensor | None = None) -> torch.Tensor:
    """Condition vectors ``(B, num_classes + 3)`` of videos of class ``labels (B,)`` moving at
    ``velocities (B, 2)`` px/frame (y, x); ``velocities=None`` means no video's motion is given,
    ``given (B,)`` bool says which rows carry their velocity (default: all when velocities are
    passed).  Velocities are scaled by ``max_speed`` so the features stay in [-1, 1]."""
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"motion_features: labels must be (B,) integers, got {tuple(labels.shape)} {labels.dtype}")
    B = labels.shape[0]
    if B and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"motion_features: labels must lie in [0, {num_classes - 1}], got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if not max_speed > 0:
        raise ValueError(f"motion_features: max_speed must be > 0, got {max_speed}")
    feats = torch.zeros(B, motion_condition_dim(num_classes))
    feats[torch.arange(B), labels.long()] = 1.0
    if velocities is None:
        if given is not None and bool(torch.as_tensor(given).any()):
            raise ValueError("motion_features: `given` marks rows whose motion is given, but no velocities were passed")
        return feats
    v = torch.as_tensor(velocities, dtype=torch.float32)
    if tuple(v.shape) != (B, 2):
        raise ValueError(f"motion_features: velocities must be (B, 2) = ({B}, 2) (v_y, v_x), got {tuple(v.shape)}")
    if float(v.abs().max()) > max_speed:
        raise ValueError(f"motion_features: |velocity| must be <= max_speed = {max_speed}, got {float(v.abs().max())}")
    g = torch.ones(B, dtype=torch.bool) if given is None else torch.as_tensor(given)
    if g.dtype != torch.bool or tuple(g.shape) != (B,):
        raise ValueError(f"motion_features: given must be a (B,) = ({B},) bool mask, got {tuple(g.shape)} {g.dtype}")
    feats[:, num_classes:num_classes + 2] = torch.where(g[:, None], v / max_speed, torch.zeros_like(v))
    feats[:, -1] = g.float()
    return feats


def motion_condition(labels: torch.Tensor, velocities: torch.Tensor | None = None, *, num_classes: int,
                     max_speed: float, given: torch.Tensor | None = None) -> msar.Condition:
    """:func:`motion_features` as a ``vector`` :class:`msar.Condition` for :func:`msar.sample`."""
    return msar.Condition.vector(motion_features(labels, velocities, num_classes=num_classes, max_speed=max_speed,
                                                 given=given))


def draw_velocities(pool: np.ndarray | torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` velocities ``(n, 2)`` drawn uniformly with replacement from the rows of ``pool (N, 2)``
    (the training videos' velocities): sampling then sees the motion the data has."""
    pool = torch.as_tensor(np.asarray(pool), dtype=torch.float32)
    if pool.dim() != 2 or pool.shape[1] != 2 or len(pool) == 0:
        raise ValueError(f"draw_velocities: pool must be (N >= 1, 2) velocities, got {tuple(pool.shape)}")
    return pool[torch.randint(0, len(pool), (n,), generator=generator)]


def motion_following(videos: torch.Tensor, velocities: torch.Tensor | np.ndarray) -> dict:
    """Does every video move at the velocity it was asked for?  ``videos (B, 1, T, H, W)`` in
    [-1, 1], ``velocities (B, 2)`` px/frame (y, x).

    A bounce reverses a component but keeps its speed, so the speed is compared on every step:
    ``speed_error`` is the mean over videos and axes of ``|median_t |dc_t| - |v||`` (centroid
    steps ``dc_t``, px/frame); ``direction_agreement`` is the share of axes with ``v != 0`` whose
    first step has the sign of ``v`` (a bounce on the first step is the only honest miss: real
    videos measured against their own velocities give the floor of both).  Videos without a
    track (an empty frame) are skipped."""
    v = np.asarray(torch.as_tensor(velocities, dtype=torch.float64))
    c = centroids(videos)
    if v.shape != (c.shape[0], 2):
        raise ValueError(f"motion_following: velocities must be (B, 2) = ({c.shape[0]}, 2), got {v.shape}")
    if c.shape[1] < 2:
        raise ValueError(f"motion_following: videos need >= 2 frames, got {c.shape[1]}")
    steps = np.diff(c, axis=1)  # (B, T-1, 2)
    ok = np.isfinite(steps).all(axis=(1, 2))
    if not ok.any():
        return {"speed_error": float("nan"), "direction_agreement": float("nan"), "videos": 0}
    speed = np.median(np.abs(steps[ok]), axis=1)  # (B', 2)
    moving = v[ok] != 0
    first = np.sign(steps[ok][:, 0])
    return {"speed_error": float(np.abs(speed - np.abs(v[ok])).mean()),
            "direction_agreement": float((first[moving] == np.sign(v[ok][moving])).mean()) if moving.any()
            else float("nan"),
            "videos": int(ok.sum())}
