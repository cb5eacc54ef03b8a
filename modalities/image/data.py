"""Image data: scikit-learn's bundled digits (no download) and image folders read with PIL.

Images are float tensors ``(C, H, W)`` in [-1, 1], VAR's convention.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class DigitsSplit:
    images: torch.Tensor  # (N, 1, size, size) in [-1, 1]
    labels: torch.Tensor  # (N,) long in [0, 10)


def load_digits(size: int = 16, val_fraction: float = 0.15, seed: int = 0) -> tuple[DigitsSplit, DigitsSplit]:
    """scikit-learn's 1797 8x8 digits, bilinearly upscaled to ``size``, split train / held-out
    (a seeded shuffle; ``val_fraction`` of the digits are held out)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x * 2 - 1
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_val = int(round(len(y) * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    return DigitsSplit(x[train], y[train]), DigitsSplit(x[val], y[val])


def digits_splits(size: int = 16, seed: int = 0, test_fraction: float = 0.15,
                  val_fraction: float = 0.1) -> tuple[DigitsSplit, DigitsSplit, DigitsSplit]:
    """``(train, val, test)``: the test split is :func:`load_digits`' held-out split (``test_fraction``
    of all digits, never used for training or model selection); ``val_fraction`` of the rest
    is carved off the training digits for early stopping."""
    rest, test = load_digits(size, test_fraction, seed)
    perm = torch.randperm(len(rest.labels), generator=torch.Generator().manual_seed(seed + 1))
    n_val = int(round(len(rest.labels) * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    return (DigitsSplit(rest.images[train], rest.labels[train]), DigitsSplit(rest.images[val], rest.labels[val]), test)


def augment_digits(images: torch.Tensor, generator: torch.Generator, max_shift: float = 1.5,
                   max_rotate_deg: float = 10.0, max_scale: float = 0.1) -> torch.Tensor:
    """Random small affine distortions of ``(N, C, H, W)`` images in [-1, 1] (background -1):
    a rotation in ``+-max_rotate_deg``, a zoom in ``1 +- max_scale`` and a shift of up to
    ``max_shift`` pixels per axis, bilinear; what moves in from outside is background."""
    N, _, H, W = images.shape
    u = torch.rand(N, 4, generator=generator) * 2 - 1  # one draw per image: angle, zoom, dx, dy
    angle = u[:, 0] * max_rotate_deg * math.pi / 180
    zoom = 1 + u[:, 1] * max_scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid works in [-1, 1] coordinates: one pixel is 2 / W
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * max_shift * 2 / W], 1),
                         torch.stack([sin, cos, u[:, 3] * max_shift * 2 / H], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # zero padding is the background once the images are shifted to [0, 1]
    out = F.grid_sample((images + 1) / 2, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out * 2 - 1).clamp(-1, 1)


def find_images(root: str) -> list[tuple[str, int, list[str]]]:
    """Class-folder layout ``root/<class>/<file>``: returns (path, class index, class names).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the folder for a missing or empty root.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    items = []
    if classes:
        for ci, c in enumerate(classes):
            for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
                items += [(os.path.join(dirpath, f), ci) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
    else:  # a flat folder of images: one class
        classes = [os.path.basename(os.path.normpath(root))]
        items = [(os.path.join(root, f), 0) for f in sorted(os.listdir(root)) if f.lower().endswith(IMG_EXTENSIONS)]
    if not items:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root}")
    return [(p, c, classes) for p, c in items]


def load_image(path: str, size: int, channels: int = 3) -> torch.Tensor:
    """Read one image with PIL, resize the shorter side to ``size`` (Lanczos), centre-crop, map to [-1, 1]."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            w, h = im.size
            s = size / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.LANCZOS)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
            arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if channels == 1 else t.permute(2, 0, 1).contiguous()


class ImageFolder(torch.utils.data.Dataset):
    """``root/<class>/*.png|jpg`` -> ``(image (C, size, size) in [-1, 1], class index)``."""

    def __init__(self, root: str, size: int, channels: int = 3, hflip: bool = False):
        self.items = find_images(root)
        self.classes = self.items[0][2]
        self.size, self.channels, self.hflip = size, channels, hflip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, c, _ = self.items[i]
        x = load_image(path, self.size, self.channels)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, c


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``(B, C, H, W)`` in [-1, 1] -> ``(B, H, W, 3)`` uint8 (the guided-diffusion evaluator layout)."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images: torch.Tensor, path: str, nrow: int, scale: int = 1, pad: int = 1) -> None:
    """Write ``(N, C, H, W)`` images in [-1, 1] as one PNG grid with ``nrow`` images per row."""
    from PIL import Image

    arr = to_uint8(images)
    N, H, W, _ = arr.shape
    ncol = nrow
    nrows = (N + ncol - 1) // ncol
    canvas = np.full((nrows * (H + pad) + pad, ncol * (W + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(N):
        r, c = divmod(i, ncol)
        canvas[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = arr[i]
    im = Image.fromarray(canvas)
    if scale != 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    im.save(path)


def save_labelled_grid(images: torch.Tensor, path: str, row_labels: Sequence[str] | None = None,
                       col_labels: Sequence[str] | None = None, title: str = "", cell: float = 0.75) -> None:
    """Write ``(R, C, channels, H, W)`` images in [-1, 1] as a PNG grid with a label per row
    (left), per column (top) and a title; ``cell`` is the size of one image in inches."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R, C = images.shape[:2]
    arr = to_uint8(images.flatten(0, 1)).reshape(R, C, *images.shape[-2:], 3)
    left = 1.3 if row_labels else 0.1
    top = (0.45 if col_labels else 0.1) + (0.25 * (title.count("\n") + 1) if title else 0)
    fig, axes = plt.subplots(R, C, figsize=(max(4.0, left + C * cell), top + R * cell), squeeze=False)
    for r in range(R):
        for c in range(C):
            ax = axes[r, c]
            ax.imshow(arr[r, c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0 and row_labels:
                ax.set_ylabel(row_labels[r], rotation=0, ha="right", va="center", fontsize=8)
            if r == 0 and col_labels:
                ax.set_title(col_labels[c], fontsize=8)
    W, H = fig.get_size_inches()
    fig.subplots_adjust(left=left / W, right=1 - 0.05 / W, bottom=0.05 / H, top=1 - top / H, wspace=0.05, hspace=0.05)
    if title:
        fig.suptitle(title, fontsize=9, y=1 - 0.05 / H, va="top")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
