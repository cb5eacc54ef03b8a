"""ImageNet in the standard folder layout, with VAR's augmentation, for multi-worker,
multi-GPU, exactly resumable training.

Layout: ``ROOT/train/<wnid>/*.JPEG`` and ``ROOT/val/<wnid>/*.JPEG`` (the validation
images sorted into class folders, as torchvision's ``ImageFolder`` expects).  Class
indices are the sorted ``wnid`` folder names of the *train* split, so train and val agree
even when val lacks a class.

Augmentation (VAR's ``build_dataset``): resize the shorter side to ``round(1.125 x size)``
with Lanczos, a random crop of ``size x size`` (train) or the centre crop (val), optional
horizontal flip, map to [-1, 1].  It is written with PIL and reproduces torchvision's PIL
path (``Resize(int, LANCZOS)``, ``RandomCrop``, ``CenterCrop``, ``ToTensor``) pixel for pixel,
so torchvision is not needed.

Determinism: the random crop and flip of sample ``i`` in epoch ``e`` come from a generator
seeded by ``(seed, e, i)``, never from the global RNG, so a batch is the same whichever
worker loads it and whether or not the run was resumed.  :class:`EpochSampler` (a
``DistributedSampler``) hands the dataset ``(epoch, index)`` pairs; on resume it can skip
the already-consumed part of an epoch without decoding it (:meth:`EpochSampler.skip_next`).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from msar.training import distributed as D

IMG_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
MID_RESO = 1.125  # VAR: resize to 1.125 x the final size before cropping


# ---------------------------------------------------------------------------- file lists
def list_classes(split_dir: str) -> list[str]:
    """Sorted class folder names under ``split_dir``; errors name the folder."""
    if not os.path.isdir(split_dir):
        raise FileNotFoundError(f"ImageNet split folder not found: {split_dir} (expected <root>/train/<wnid>/*.JPEG)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ValueError(f"no class folders in {split_dir}: expected one sub-folder per class (<wnid>/*.JPEG)")
    return classes


def scan_split(split_dir: str, classes: Sequence[str], max_per_class: int | None = None) -> list[tuple[str, int]]:
    """``[(path, class index)]`` sorted by class then file name (the order is part of the
    determinism contract). Class folders of ``split_dir`` not in ``classes`` are an error."""
    present = list_classes(split_dir)
    index = {c: i for i, c in enumerate(classes)}
    unknown = [c for c in present if c not in index]
    if unknown:
        raise ValueError(f"{split_dir} has class folders that the training split lacks: {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    items: list[tuple[str, int]] = []
    for c in present:
        folder = os.path.join(split_dir, c)
        files = sorted(e.name for e in os.scandir(folder) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        if max_per_class is not None:
            files = files[:max_per_class]
        items += [(os.path.join(folder, f), index[c]) for f in files]
    if not items:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {split_dir}")
    return items


def cached_scan(split_dir: str, classes: Sequence[str], cache: str | None = None,
                max_per_class: int | None = None) -> list[tuple[str, int]]:
    """:func:`scan_split` with an optional JSON cache (listing 1.28M files on a network file
    system takes minutes; every rank would do it). Paths are stored relative to ``split_dir``."""
    if cache and os.path.isfile(cache):
        with open(cache) as f:
            meta = json.load(f)
        if meta.get("classes") == list(classes) and meta.get("max_per_class") == max_per_class:
            return [(os.path.join(split_dir, p), c) for p, c in meta["items"]]
    items = scan_split(split_dir, classes, max_per_class)
    if cache and D.is_main():
        tmp = f"{cache}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"classes": list(classes), "max_per_class": max_per_class,
                       "items": [(os.path.relpath(p, split_dir), c) for p, c in items]}, f)
        os.replace(tmp, cache)
    return items


# ---------------------------------------------------------------------------- transforms
def resize_shorter(im, size: int):
    """Shorter side -> ``size`` with Lanczos, the longer one ``int(size x long / short)`` (torchvision's rule)."""
    from PIL import Image

    w, h = im.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return im if new == (w, h) else im.resize(new, Image.LANCZOS)


def crop_box(w: int, h: int, size: int, train: bool, gen: torch.Generator | None) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a random (``train``) or centre ``size x size`` crop."""
    if w < size or h < size:
        raise ValueError(f"image of {w}x{h} is smaller than the crop {size}x{size}")
    if train:
        top = int(torch.randint(0, h - size + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - size + 1, (1,), generator=gen))
    else:
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return left, top, left + size, top + size


def pil_to_pm1(im) -> torch.Tensor:
    """RGB PIL image -> ``(3, H, W)`` float in [-1, 1] (``ToTensor`` then ``x * 2 - 1``, as VAR)."""
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255).mul_(2).sub_(1)


def load_rgb(path: str):
    """Open an image as RGB; an unreadable / corrupt file raises ``ValueError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def augment(im, size: int, train: bool, hflip: bool, gen: torch.Generator | None,
            mid_reso: float = MID_RESO) -> torch.Tensor:
    """VAR's augmentation of one RGB PIL image -> ``(3, size, size)`` in [-1, 1]."""
    im = resize_shorter(im, round(mid_reso * size))
    im = im.crop(crop_box(im.size[0], im.size[1], size, train, gen))
    x = pil_to_pm1(im)
    if hflip and bool(torch.rand((), generator=gen) < 0.5):
        x = x.flip(-1)
    return x


# ---------------------------------------------------------------------------- dataset
class ImageNetFolder(Dataset):
    """One split of ImageNet: ``ds[i]`` or ``ds[(epoch, i)]`` -> ``(image (3, size, size) in [-1, 1], label)``.

    ``train=True`` uses the random crop (and ``hflip``), seeded by ``(seed, epoch, i)``;
    ``train=False`` the centre crop.  ``classes`` fixes the label order (pass the train
    split's :attr:`classes` to a val split).  ``max_per_class`` takes the first files of
    every class (quick experiments).  ``index_cache`` is a JSON file list (see :func:`cached_scan`).
    """

    def __init__(self, root: str, split: str = "train", size: int = 256, train: bool | None = None,
                 hflip: bool = False, classes: Sequence[str] | None = None, seed: int = 0,
                 max_per_class: int | None = None, index_cache: str | None = None,
                 mid_reso: float = MID_RESO):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageNet root not found: {root} (expected {root}/train/<wnid>/*.JPEG)")
        self.root, self.split, self.size = root, split, int(size)
        self.split_dir = os.path.join(root, split)
        self.train = (split == "train") if train is None else train
        self.hflip, self.seed, self.mid_reso = hflip, int(seed), mid_reso
        self.classes = list(classes) if classes is not None else list_classes(self.split_dir)
        self.items = cached_scan(self.split_dir, self.classes, index_cache, max_per_class)
        self.skip_shape = (3, self.size, self.size)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.items)

    def generator(self, epoch: int, index: int) -> torch.Generator:
        # a per-sample stream: independent of worker, rank and resume
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 10_000_019 + index)

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        epoch, index, skip = _parse_key(key)
        path, label = self.items[index]
        if skip:  # a batch the resumed trainer discards: do not decode it
            return torch.zeros(self.skip_shape), label
        gen = self.generator(epoch, index) if self.train else None
        return augment(load_rgb(path), self.size, self.train, self.hflip and self.train, gen, self.mid_reso), label


class SyntheticImageNet(Dataset):
    """ImageNet-shaped random images (smooth colour blobs), for throughput checks and tests:
    ``ds[(epoch, i)]`` -> ``((3, size, size) in [-1, 1], label = i % num_classes)``."""

    def __init__(self, n: int, size: int = 256, num_classes: int = 1000, seed: int = 0):
        self.n, self.size, self.num_classes, self.seed = n, size, num_classes, seed
        self.classes = [f"n{c:08d}" for c in range(num_classes)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> tuple[torch.Tensor, int]:
        epoch, index, _ = _parse_key(key)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        low = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
        x = torch.nn.functional.interpolate(low, size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        return x.clamp_(-1, 1), index % self.num_classes


def _parse_key(key) -> tuple[int, int, bool]:
    if isinstance(key, (tuple, list)):
        epoch, index = int(key[0]), int(key[1])
        return epoch, index, bool(key[2]) if len(key) > 2 else False
    return 0, int(key), False


# ---------------------------------------------------------------------------- sampler + loader
class EpochSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(epoch, index, skip)`` so the dataset can seed its
    augmentation per epoch. The order is a function of ``(seed, epoch)`` only.

    ``skip_next(n)``: the next iteration marks its first ``n`` indices as skipped (the
    dataset returns placeholders without decoding), which makes the trainer's fast-forward
    to a mid-epoch resume position cheap.
    """

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = True):
        super().__init__(dataset, num_replicas=D.world_size(), rank=D.rank(), shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._skip = 0

    def skip_next(self, n: int) -> None:
        self._skip = max(0, int(n))

    def __iter__(self) -> Iterator[tuple[int, int, bool]]:
        skip, self._skip = self._skip, 0
        for j, i in enumerate(super().__iter__()):
            yield self.epoch, i, j < skip


def build_imagenet_loader(dataset: Dataset, batch_size: int, shuffle: bool = True, seed: int = 0,
                          drop_last: bool = True, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """This rank's loader (``batch_size`` per rank) over :class:`EpochSampler`; like
    :func:`msar.training.build_loader` but with per-epoch augmentation seeds.  The loader's
    own generator keeps it from drawing on the global RNG (worker seeds), so evaluating a
    validation loader mid-training does not change the training run."""
    sampler = EpochSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=False, generator=torch.Generator().manual_seed(seed),
                      prefetch_factor=4 if num_workers > 0 else None)
