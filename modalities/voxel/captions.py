"""Captions of procedural voxel shapes, read from their geometry, and the checks that score a
generated grid against its caption.

Grammar (:data:`CATEGORIES` of :mod:`modalities.voxel.data`)::

    furniture  := "a" (tall | low) (table | chair) "with four legs"
                | "a" (tall | low) "shelf with" (two | three | four | five) "boards"
    primitive  := "a" (large | small) (sphere | box)

    e.g. "a low table with four legs", "a tall shelf with three boards", "a large sphere"

Every word is measured on the occupancy grid, so a caption holds for its shape and the same
measurement scores a generated one (:func:`check_caption`):

* ``tall`` / ``low``: height (z extent) over the larger horizontal extent, above / below 1;
* ``large`` / ``small``: the largest extent of the bounding box, above / below ``R * 9 / 16``;
* boards: runs of horizontal slices covering at least 60% of the fullest slice;
* legs: :func:`modalities.voxel.metrics.count_legs`.

Shapes within 10% of a threshold get no caption (the next shape of the stream is taken), so
the words of the data are never borderline. Compositional generalisation: the
(word, category) pairs of :data:`HELD_OUT` (every tall table, every small sphere) never appear
in ``train`` / ``val``; ``test_heldout`` holds only them.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .data import shape_at
from .metrics import count_legs

FURNITURE = ("table", "chair", "shelf")
PRIMITIVES = ("sphere", "box")  # (rotated cylinders and boxes look alike at 16^3)
CATEGORIES = FURNITURE + PRIMITIVES
HELD_OUT: tuple[tuple[str, str], ...] = (("tall", "table"), ("small", "sphere"))
SPLITS = ("train", "val", "test_seen", "test_heldout")
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five"}
_MARGIN = 0.1  # relative distance to a threshold below which a shape gets no caption


@dataclass(frozen=True)
class ShapeCaption:
    """What a caption says: the category, its adjective (tall / low / large / small), the number
    of boards (shelves) and of legs (tables, chairs); None where the caption says nothing."""

    category: str
    adjective: str
    boards: int | None = None
    legs: int | None = None

    @property
    def pair(self) -> tuple[str, str]:
        return (self.adjective, self.category)

    def text(self) -> str:
        if self.category == "shelf":
            return f"a {self.adjective} shelf with {NUMBERS[self.boards]} boards"
        if self.category in FURNITURE:
            return f"a {self.adjective} {self.category} with {NUMBERS[self.legs]} legs"
        return f"a {self.adjective} {self.category}"


# ---------------------------------------------------------------------------- measurements
def extents(vox: np.ndarray) -> np.ndarray:
    """Bounding-box extents ``(x, y, z)`` in voxels of one grid ``(R, R, R)`` (zeros when empty)."""
    idx = np.argwhere(np.asarray(vox, dtype=bool))
    return idx.max(0) - idx.min(0) + 1 if len(idx) else np.zeros(3, dtype=int)


def height_ratio(vox: np.ndarray) -> float:
    """z extent over the larger horizontal extent (0 for an empty grid)."""
    e = extents(vox)
    return float(e[2] / max(e[0], e[1])) if e.any() else 0.0


def size_ratio(vox: np.ndarray) -> float:
    """The largest extent over the large/small threshold ``R * 9 / 16``."""
    v = np.asarray(vox)
    return float(extents(v).max() / (v.shape[0] * 9 / 16))


def count_boards(vox: np.ndarray, fraction: float = 0.6) -> int:
    """Runs of consecutive horizontal slices whose area is at least ``fraction`` of the largest."""
    area = np.asarray(vox, dtype=bool).sum(axis=(0, 1))
    if area.max() == 0:
        return 0
    full = area >= fraction * area.max()
    return int(full[0] + np.sum(full[1:] & ~full[:-1]))


def describe(vox: np.ndarray, category: str) -> ShapeCaption | None:
    """The caption of a real shape of ``category``; None when a measurement is borderline (or the
    shelf's board count is outside 2-5)."""
    if category in FURNITURE:
        r = height_ratio(vox)
        if abs(r - 1) < _MARGIN:
            return None
        adjective = "tall" if r > 1 else "low"
        if category == "shelf":
            boards = count_boards(vox)
            return ShapeCaption(category, adjective, boards=boards) if boards in NUMBERS else None
        return ShapeCaption(category, adjective, legs=4)
    if category in PRIMITIVES:
        s = size_ratio(vox)
        if abs(s - 1) < _MARGIN:
            return None
        return ShapeCaption(category, "large" if s > 1 else "small")
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


_WORDS = "|".join(NUMBERS.values())
_PATTERNS = (
    re.compile(rf"^a (tall|low) (table|chair) with ({_WORDS}) legs$"),
    re.compile(rf"^a (tall|low) (shelf) with ({_WORDS}) boards$"),
    re.compile(r"^a (large|small) (sphere|box)$"),
)


def parse_shape_caption(text: str) -> ShapeCaption:
    """Caption -> :class:`ShapeCaption`; ``ValueError`` naming the grammar for anything else."""
    number = {v: k for k, v in NUMBERS.items()}
    for i, p in enumerate(_PATTERNS):
        m = p.match(text.strip())
        if m is None:
            continue
        g = m.groups()
        if i == 0:
            return ShapeCaption(g[1], g[0], legs=number[g[2]])
        if i == 1:
            return ShapeCaption(g[1], g[0], boards=number[g[2]])
        return ShapeCaption(g[1], g[0])
    raise ValueError(f"not a caption of the shape grammar: {text!r}; expected 'a tall|low table|chair with N legs', "
                     f"'a tall|low shelf with N boards' or 'a large|small sphere|box' (N in {list(NUMBERS.values())})")


def check_caption(vox: np.ndarray, want: ShapeCaption, category: str | None = None) -> dict:
    """Per-attribute agreement of a grid with a caption: ``category`` (from a classifier, passed in;
    None skips it), ``adjective`` (the measurement's side of the threshold), ``parts`` (boards of a
    shelf, legs of a table or chair; None for primitives) and ``all``."""
    out: dict = {"category": None if category is None else category == want.category}
    if want.category in FURNITURE:
        out["adjective"] = (height_ratio(vox) > 1) == (want.adjective == "tall")
    else:
        out["adjective"] = (size_ratio(vox) > 1) == (want.adjective == "large")
    if want.boards is not None:
        out["parts"] = count_boards(vox) == want.boards
    elif want.legs is not None:
        out["parts"] = count_legs(vox) == want.legs
    else:
        out["parts"] = None
    out["all"] = all(v for v in out.values() if v is not None)
    return out


# ---------------------------------------------------------------------------- captioned sets
def reference_shapes(n: int, seed: int = 0, resolution: int = 16) -> tuple[np.ndarray, list[str]]:
    """``n`` real shapes of every category in turn, with no caption filter and no held-out pair
    left out -- what an evaluation classifier learns the categories from (its own shape stream,
    apart from every split's): ``(voxels (n, R, R, R) bool, categories)``."""
    cats = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]
    stream = 10_000_000 + int(seed)
    vox = [shape_at(stream, i, resolution, classes=[c])[0] for i, c in enumerate(cats)]
    return (np.stack(vox) if vox else np.zeros((0,) + (resolution,) * 3, dtype=bool)), cats


def captioned_shapes(split: str, n: int, seed: int = 0, resolution: int = 16,
                     held_out: Sequence[tuple[str, str]] = HELD_OUT) -> tuple[np.ndarray, list[ShapeCaption]]:
    """``n`` captioned shapes of ``split``: ``(voxels (n, R, R, R) bool, captions)``, deterministic from
    ``seed``. Categories cycle; a shape without a caption (borderline), or whose (adjective,
    category) pair does not belong to the split, is skipped for the next one of the stream."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    held = {tuple(h) for h in held_out}
    wanted = list(CATEGORIES) if split != "test_heldout" else [c for c in CATEGORIES if c in {h[1] for h in held}]
    stream = 4 * int(seed) + SPLITS.index(split)  # one shape stream per (seed, split)
    vox, caps, j = [], [], 0
    while len(caps) < n:
        category = wanted[len(caps) % len(wanted)]
        v, _ = shape_at(stream, j, resolution, classes=[category])
        j += 1
        cap = describe(v, category)
        if cap is None or ((cap.pair in held) != (split == "test_heldout")):
            continue
        vox.append(v)
        caps.append(cap)
        if j > 200 * (n + 10):
            raise RuntimeError(f"found only {len(caps)} of {n} shapes for {split} in {j} draws")
    return (np.stack(vox) if vox else np.zeros((0,) + (resolution,) * 3, dtype=bool)), caps
