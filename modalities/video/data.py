"""Moving digits: scikit-learn's 8x8 digits bouncing on a canvas, made on the fly.

Every sample is one digit image (upscaled to ``digit_size``) moving at a constant
integer velocity and reflecting off the canvas borders; the label is the digit.
The whole dataset is a deterministic function of ``seed`` (no download: the
digits ship with scikit-learn).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class MovingDigitsConfig:
    num_frames: int = 9
    size: int = 32
    digit_size: int = 16
    max_speed: int = 3
    num_classes: int = 10


def _digit_images(digit_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1797 sklearn digits as ``(N, digit_size, digit_size)`` floats in [0, 1] and labels."""
    from sklearn.datasets import load_digits
    d = load_digits()
    imgs = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    if digit_size != 8:
        imgs = F.interpolate(imgs, size=(digit_size, digit_size), mode="bilinear", align_corners=False)
    return imgs.squeeze(1).clamp(0, 1).numpy(), d.target.astype(np.int64)


def bounce_trajectory(start: int, velocity: int, lo: int, hi: int, steps: int) -> np.ndarray:
    """Positions of a point moving at ``velocity`` px/frame and reflecting off ``[lo, hi]``."""
    pos, v, out = start, velocity, []
    for _ in range(steps):
        out.append(pos)
        nxt = pos + v
        if nxt > hi:
            nxt, v = 2 * hi - nxt, -v
        elif nxt < lo:
            nxt, v = 2 * lo - nxt, -v
        pos = nxt
    return np.asarray(out, dtype=np.int64)


class MovingDigits(torch.utils.data.Dataset):
    """``num_samples`` videos ``(1, T, size, size)`` in ``[-1, 1]`` with labels 0-9.

    Args:
        num_samples: dataset length.
        num_frames: T (default 9 = the first frame + 8, the ``1 + 4n`` length a causal
            tokenizer with time stride 4 or 2 wants).
        size: canvas side (32 or 64).
        digit_size: side the 8x8 digit is upscaled to.
        max_speed: velocity components are drawn from ``[-max_speed, max_speed]`` (never both 0).
        seed: everything (digit choice, start, velocity) derives from it.
        split: ``"train"`` uses the first 80% of the sklearn digits, ``"test"`` the rest,
            ``"all"`` every digit (so a held-out split never shows the same image).
    """

    def __init__(self, num_samples: int, num_frames: int = 9, size: int = 32, digit_size: int = 16,
                 max_speed: int = 3, seed: int = 0, split: str = "train"):
        if num_samples <= 0 or num_frames <= 0:
            raise ValueError(f"num_samples and num_frames must be positive, got {num_samples}, {num_frames}")
        if digit_size > size:
            raise ValueError(f"digit_size {digit_size} does not fit the canvas {size}")
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        self.num_frames, self.size, self.digit_size, self.max_speed = num_frames, size, digit_size, max_speed
        imgs, labels = _digit_images(digit_size)
        cut = int(0.8 * len(imgs))
        pool = {"train": np.arange(cut), "test": np.arange(cut, len(imgs)), "all": np.arange(len(imgs))}[split]
        rng = np.random.default_rng(seed)
        self.image_ids = rng.choice(pool, size=num_samples)
        self.images, self.all_labels = imgs, labels
        self.labels = torch.from_numpy(labels[self.image_ids])
        hi = size - digit_size
        self.starts = rng.integers(0, hi + 1, size=(num_samples, 2))
        vel = rng.integers(-max_speed, max_speed + 1, size=(num_samples, 2))
        still = (vel == 0).all(axis=1)
        vel[still, 0] = rng.choice([-1, 1], size=int(still.sum())) * max(1, max_speed)
        self.velocities = vel
        # top-left corners (N, T, 2) as (y, x)
        self.positions = np.stack([
            np.stack([bounce_trajectory(int(s[a]), int(v[a]), 0, hi, num_frames) for a in (0, 1)], axis=-1)
            for s, v in zip(self.starts, vel)
        ])

    def __len__(self) -> int:
        return len(self.image_ids)

    def render(self, i: int) -> torch.Tensor:
        """Video i as ``(1, T, size, size)`` in ``[0, 1]``."""
        T, S, d = self.num_frames, self.size, self.digit_size
        out = np.zeros((T, S, S), dtype=np.float32)
        img = self.images[self.image_ids[i]]
        for t, (y, x) in enumerate(self.positions[i]):
            out[t, y:y + d, x:x + d] = np.maximum(out[t, y:y + d, x:x + d], img)
        return torch.from_numpy(out).unsqueeze(0)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.render(i) * 2 - 1, self.labels[i]

    def tensors(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n (default all) videos stacked: ``(n, 1, T, S, S)`` in [-1, 1], labels ``(n,)``."""
        n = len(self) if n is None else min(n, len(self))
        return torch.stack([self[i][0] for i in range(n)]), self.labels[:n].clone()

    def centres(self, n: int | None = None) -> np.ndarray:
        """True digit centres ``(n, T, 2)`` (y, x) in pixels."""
        n = len(self) if n is None else n
        return self.positions[:n].astype(np.float64) + (self.digit_size - 1) / 2
