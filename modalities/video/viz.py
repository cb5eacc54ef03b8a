"""Animated GIFs and PNG filmstrips of grayscale videos ``(N, 1, T, H, W)`` in ``[-1, 1]`` (Pillow only)."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def _frames_uint8(videos: torch.Tensor) -> np.ndarray:
    """``(N, 1, T, H, W)`` in [-1, 1] -> ``(N, T, H, W)`` uint8."""
    if videos.dim() != 5 or videos.shape[1] != 1:
        raise ValueError(f"expected grayscale videos (N, 1, T, H, W), got {tuple(videos.shape)}")
    v = ((videos[:, 0].detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
    return v.to(torch.uint8).numpy()


def _grid(frames: np.ndarray, nrow: int, pad: int, pad_value: int) -> np.ndarray:
    """``(N, H, W)`` -> one image, ``nrow`` tiles per row."""
    N, H, W = frames.shape
    rows = (N + nrow - 1) // nrow
    out = np.full((rows * (H + pad) + pad, nrow * (W + pad) + pad), pad_value, dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, nrow)
        out[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = frames[i]
    return out


def save_gif(videos: torch.Tensor, path: str, nrow: int = 8, scale: int = 2, duration_ms: int = 150,
             pad: int = 2, pad_value: int = 90) -> str:
    """One animated GIF: frame t shows frame t of every video in a grid; loops forever."""
    f = _frames_uint8(videos)  # (N, T, H, W)
    N, T = f.shape[:2]
    images = []
    for t in range(T):
        g = _grid(f[:, t], min(nrow, N), pad, pad_value)
        images.append(Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=duration_ms, loop=0, optimize=False)
    return path


def save_filmstrip(videos: torch.Tensor, path: str, row_labels: Sequence[str] | None = None, scale: int = 2,
                   pad: int = 2, pad_value: int = 90, title: str | None = None,
                   unknown: torch.Tensor | None = None) -> str:
    """A PNG: one row per video, one column per frame.

    ``unknown`` ``(N, T, H, W)`` bool (optional) tints the pixels a model had to generate
    (red), so editing figures show what was given and what was made.
    """
    f = _frames_uint8(videos)
    N, T, H, W = f.shape
    label_w = 0 if not row_labels else 8 + 7 * max(len(s) for s in row_labels)
    head = 0 if not title else 14
    cell_h, cell_w = H * scale, W * scale
    img = Image.new("RGB", (label_w + T * (cell_w + pad) + pad, head + N * (cell_h + pad) + pad),
                    (pad_value,) * 3)
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((4, 1), title, fill=(255, 255, 255))
    for i in range(N):
        for t in range(T):
            rgb = np.repeat(f[i, t][..., None], 3, axis=-1).astype(np.float32)
            if unknown is not None:
                m = unknown[i, t].cpu().numpy()
                rgb[m] = rgb[m] * np.array([1.0, 0.55, 0.55]) + np.array([60.0, 0.0, 0.0])
            tile = Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).resize((cell_w, cell_h), Image.NEAREST)
            img.paste(tile, (label_w + pad + t * (cell_w + pad), head + pad + i * (cell_h + pad)))
        if row_labels:
            draw.text((3, head + pad + i * (cell_h + pad) + cell_h // 2 - 5), row_labels[i], fill=(255, 255, 255))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
