"""Read shapes, colours, sizes, count and relative position back from a scene image, to score
generated scenes against their captions.

    pixels  -> colour: nearest palette colour of every bright pixel (max channel > 0.5)
    objects =  8-connected components of each colour (fewer than ``min_area`` pixels: noise)
    size    =  "large" when the bounding box side exceeds a threshold fitted on real objects
    shape   =  a small MLP on the component's mask, cropped to its box and resized to 12 x 12,
               trained on rendered objects (sizes jittered, edge pixels flipped)
    score   =  match caption objects to detected ones (the assignment with the most agreeing
               attributes), then per attribute: all objects right (shape, colour, size), the
               number of objects (count), the relation of two / the left-to-right order of
               three matched objects (position)

The detector never sees generated images in training; its accuracy on real held-out scenes
(:meth:`ShapeDetector.accuracy_on_real`) says how far its reading of generated ones can be
trusted.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

from .captioned_shapes import (CANVAS, COLOURS, SHAPES, SIZES, CaptionAttributes, CaptionedScenes, relation_of,
                               shape_mask)

ATTRIBUTES = ("count", "shape", "colour", "size", "position")
CROP = 12  # side of the resized component mask the shape classifier reads


@dataclass(frozen=True)
class DetectedObject:
    shape: str
    colour: str
    size: str
    cx: float
    cy: float
    area: int


def crop_mask(mask: np.ndarray) -> torch.Tensor:
    """A component's bool mask ``(H, W)`` -> its bounding box padded to a square (centred),
    area-resized to ``(CROP, CROP)`` float in [0, 1]."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)
    h, w = box.shape
    side = max(h, w)
    sq = np.zeros((side, side), dtype=np.float32)
    sq[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = box
    t = torch.from_numpy(sq)[None, None]
    return F.interpolate(t, size=(CROP, CROP), mode="bilinear", align_corners=False)[0, 0]


def colour_labels(image: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` in [-1, 1] -> ``(H, W)`` int: 0 background, ``1 + i`` palette colour i."""
    rgb = ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()  # (H, W, 3) in [0, 1]
    palette = np.array(list(COLOURS.values()), dtype=np.float32)  # (P, 3)
    nearest = ((rgb[:, :, None, :] - palette) ** 2).sum(-1).argmin(-1)
    return np.where(rgb.max(-1) > 0.5, nearest + 1, 0)


class ShapeDetector:
    """``detect(image) -> [DetectedObject]`` and ``score(images, captions)``; build with :meth:`fit`."""

    def __init__(self, classifier: nn.Module, size_threshold: float, min_area: int = 6):
        self.classifier = classifier.eval()
        self.size_threshold = size_threshold  # bounding box side in pixels: above = large
        self.min_area = min_area

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(cls, seed: int = 0, steps: int = 300, batch_size: int = 256, min_area: int = 6) -> "ShapeDetector":
        """Train the shape classifier on masks of rendered objects (each shape at both sizes, the
        radius jittered by +-20%, sub-pixel positions, 5% of edge pixels flipped) and set the size
        threshold halfway between the largest small and the smallest large rendered box."""
        g = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(CROP * CROP, 64), nn.ReLU(), nn.Linear(64, len(SHAPES)))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        pool, labels = _training_masks(rng, 1500)
        for _ in range(steps):
            i = torch.randint(0, len(labels), (batch_size,), generator=g)
            loss = F.cross_entropy(model(pool[i]), labels[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        offsets = np.linspace(0, 1, 5, endpoint=False)
        sides = {z: [_box_side(shape_mask(s, 16 + dx, 16 + dy, r)) for s in SHAPES for dx in offsets for dy in offsets]
                 for z, r in SIZES.items()}
        threshold = (max(sides["small"]) + min(sides["large"])) / 2
        return cls(model.eval(), threshold, min_area)

    # ------------------------------------------------------------------ reading
    @torch.no_grad()
    def detect(self, image: torch.Tensor) -> list[DetectedObject]:
        """Objects of one image ``(3, H, W)`` in [-1, 1], largest first."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"detect: expected one RGB image (3, H, W), got {tuple(image.shape)}")
        labels = colour_labels(image)
        comps = []
        for ci, colour in enumerate(COLOURS, start=1):
            lab, n = ndimage.label(labels == ci, structure=np.ones((3, 3)))
            for j in range(1, n + 1):
                m = lab == j
                if m.sum() >= self.min_area:
                    comps.append((colour, m))
        if not comps:
            return []
        shapes = self.classifier(torch.stack([crop_mask(m) for _, m in comps])).argmax(-1).tolist()
        out = []
        for (colour, m), s in zip(comps, shapes):
            ys, xs = np.nonzero(m)
            out.append(DetectedObject(SHAPES[s], colour, "large" if _box_side(m) > self.size_threshold else "small",
                                      float(xs.mean() + 0.5), float(ys.mean() + 0.5), int(m.sum())))
        return sorted(out, key=lambda o: -o.area)

    def score(self, images: torch.Tensor, captions: Sequence[CaptionAttributes]) -> list[dict]:
        """Per image ``{attribute: bool or None}`` for :data:`ATTRIBUTES` plus ``"all"``
        (``position`` is None for one-object captions)."""
        if len(images) != len(captions):
            raise ValueError(f"score: {len(images)} images but {len(captions)} captions")
        return [score_detections(self.detect(x), c) for x, c in zip(images, captions)]

    def accuracy_on_real(self, data: CaptionedScenes) -> dict:
        """Per-attribute accuracy on real rendered scenes: 1.0 when the detector reads the truth."""
        return summarise(self.score(data.images, [s.attributes() for s in data.scenes]))


def _box_side(mask: np.ndarray) -> int:
    ys, xs = np.nonzero(mask)
    return int(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)


def _training_masks(rng: np.random.Generator, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    crops, labels = [], []
    for si, shape in enumerate(SHAPES):
        for i in range(per_class):
            r = list(SIZES.values())[i % len(SIZES)] * rng.uniform(0.8, 1.2)
            m = shape_mask(shape, CANVAS / 2 + rng.uniform(-1, 1), CANVAS / 2 + rng.uniform(-1, 1), r)
            edge = m ^ ndimage.binary_erosion(m)
            flip = edge & (rng.random(m.shape) < 0.05)
            m = m ^ flip
            if m.sum() == 0:
                continue
            crops.append(crop_mask(m))
            labels.append(si)
    return torch.stack(crops), torch.tensor(labels)


# ---------------------------------------------------------------------------- scoring
def _position(pick: list[DetectedObject | None], want: CaptionAttributes) -> bool | None:
    """The relation (two objects) or left-to-right order (three) of the matched objects; None for one."""
    if want.count == 1:
        return None
    if any(d is None for d in pick):
        return False
    if want.count == 2:
        return relation_of((pick[0].cx, pick[0].cy), (pick[1].cx, pick[1].cy)) == want.relation
    return pick[0].cx < pick[1].cx < pick[2].cx


def _match(dets: list[DetectedObject], want: CaptionAttributes) -> list[DetectedObject | None]:
    """Assign each caption object a distinct detected object (or None when there are fewer),
    maximising the number of agreeing (shape, colour, size); among equally good assignments
    one with the right position wins (two identical objects can be read either way round)."""
    dets = dets[:8]  # the largest; a garbled image's specks cannot help a match
    n = want.count
    slots = dets + [None] * n
    best, best_key = None, (-1, False)
    for perm in itertools.permutations(range(len(slots)), n):
        pick = [slots[p] for p in perm]
        agree = sum(0 if d is None else (d.shape == w[0]) + (d.colour == w[1]) + (d.size == w[2])
                    for d, w in zip(pick, want.objects))
        key = (agree, bool(_position(pick, want)))
        if key > best_key:
            best, best_key = pick, key
    return best


def score_detections(dets: list[DetectedObject], want: CaptionAttributes) -> dict:
    """``{count, shape, colour, size, position, all}`` for one image: bools (``position`` None
    for a one-object caption). An attribute is right when it is right for every caption object."""
    pick = _match(dets, want)
    found = all(d is not None for d in pick)
    out = {"count": len(dets) == want.count}
    for i, name in enumerate(("shape", "colour", "size")):
        out[name] = found and all(getattr(d, name) == w[i] for d, w in zip(pick, want.objects))
    out["position"] = _position(pick, want)
    out["all"] = all(v for v in out.values() if v is not None)
    return out


def summarise(scores: Sequence[dict]) -> dict:
    """Mean of every attribute over the images where it applies, and ``n`` (images)."""
    out = {"n": len(scores)}
    for k in ATTRIBUTES + ("all",):
        vals = [s[k] for s in scores if s[k] is not None]
        out[k] = float(np.mean(vals)) if vals else None
    return out
