"""Captioned scenes of coloured shapes, made on the fly and deterministic from a seed.

A scene is 1-3 solid, non-overlapping objects on a black ``32 x 32`` RGB canvas; its caption
comes from a small grammar::

    object   := "a" size colour shape                      size in {small, large}
    caption  := object                                     one object, anywhere
              | object relation object                     two objects; relation in
                                                           {left of, right of, above, below}
              | object "," object "and" object             three small objects, left to right

    e.g. "a large red circle above a small blue square"
         "a small green square, a small yellow circle and a small red triangle"

Compositional generalisation: some (shape, colour) combinations (:data:`HELD_OUT`, by default
every green triangle and every blue circle) never appear in the ``train`` and ``val`` splits;
``test_heldout`` scenes hold at least one of them, ``test_seen`` scenes none. Each shape and
each colour still appears in training, only not together. Scene ``i`` of a split is drawn from
its own RNG stream ``SeedSequence([seed, split, i])``, so it does not depend on other scenes.

Placement keeps every attribute readable from the pixels (what
:mod:`modalities.image.shape_detector` relies on): objects are at least ``GAP`` pixels apart,
for two objects the centre offset along the relation's axis is at least twice the offset
across it, and three objects are ordered left to right with a gap between their columns.
Images are float tensors ``(3, 32, 32)`` in [-1, 1] (VAR's convention); background is -1.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[float, float, float]] = {  # RGB in [0, 1]
    "red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
}
SIZES: dict[str, float] = {"small": 4.0, "large": 6.5}  # "radius" in pixels (half the bounding box side)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
HELD_OUT: tuple[tuple[str, str], ...] = (("triangle", "green"), ("circle", "blue"))  # (shape, colour)
SPLITS: tuple[str, ...] = ("train", "val", "test_seen", "test_heldout")
CANVAS = 32
GAP = 2.0            # pixels between the bounding boxes of two objects
MARGIN = 1.0         # pixels between an object's bounding box and the canvas edge
COUNT_PROBS = (0.25, 0.45, 0.30)  # probabilities of 1, 2 and 3 objects


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre in pixels (x right, y down)
    cy: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    @property
    def combo(self) -> tuple[str, str]:
        return (self.shape, self.colour)

    def words(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """``objects`` in caption order; ``relation`` of objects[0] to objects[1] for two objects
    (None otherwise; three objects are listed left to right)."""

    objects: tuple[SceneObject, ...]
    relation: str | None = None

    @property
    def count(self) -> int:
        return len(self.objects)

    def attributes(self) -> "CaptionAttributes":
        return CaptionAttributes(tuple((o.shape, o.colour, o.size) for o in self.objects), self.relation)

    def has_combo(self, combos: Sequence[tuple[str, str]]) -> bool:
        return any(o.combo in set(combos) for o in self.objects)


@dataclass(frozen=True)
class CaptionAttributes:
    """What a caption says: ``objects`` as ``(shape, colour, size)`` in caption order and the
    relation of the first to the second of two objects (None for one or three)."""

    objects: tuple[tuple[str, str, str], ...]
    relation: str | None = None

    @property
    def count(self) -> int:
        return len(self.objects)


# ---------------------------------------------------------------------------- captions
def caption(scene: Scene) -> str:
    """The grammar's sentence for ``scene`` (see the module docstring)."""
    o = scene.objects
    if len(o) == 1:
        return o[0].words()
    if len(o) == 2:
        return f"{o[0].words()} {scene.relation} {o[1].words()}"
    if len(o) == 3:
        return f"{o[0].words()}, {o[1].words()} and {o[2].words()}"
    raise ValueError(f"a scene has 1-3 objects, got {len(o)}")


_OBJ = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_PATTERNS = (
    (re.compile(rf"^{_OBJ}$"), None),
    (re.compile(rf"^{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}$"), "relation"),
    (re.compile(rf"^{_OBJ}, {_OBJ} and {_OBJ}$"), None),
)


def parse_caption(text: str) -> CaptionAttributes:
    """Read a caption of the grammar back into its attributes; ``ValueError`` naming the grammar
    for anything else (the inverse of :func:`caption` up to positions)."""
    for pattern, kind in _PATTERNS:
        m = pattern.match(text.strip())
        if m is None:
            continue
        g = m.groups()
        if kind == "relation":
            return CaptionAttributes(((g[2], g[1], g[0]), (g[6], g[5], g[4])), g[3])
        return CaptionAttributes(tuple((g[i + 2], g[i + 1], g[i]) for i in range(0, len(g), 3)))
    raise ValueError(f"not a caption of the scene grammar: {text!r}; expected 'a SIZE COLOUR SHAPE', "
                     f"'... RELATION a SIZE COLOUR SHAPE' or three objects 'a ..., a ... and a ...' with sizes "
                     f"{list(SIZES)}, colours {list(COLOURS)}, shapes {list(SHAPES)}, relations {list(RELATIONS)}")


# ---------------------------------------------------------------------------- rendering
def shape_mask(shape: str, cx: float, cy: float, radius: float, canvas: int = CANVAS) -> np.ndarray:
    """Bool ``(canvas, canvas)``: the pixels (centres at ``i + 0.5``) inside a ``shape`` of
    ``radius`` (half its bounding box side) centred at ``(cx, cy)``."""
    y, x = np.mgrid[0:canvas, 0:canvas] + 0.5
    dx, dy, r = x - cx, y - cy, radius
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        s = 0.85 * r  # about the circle's area, so size does not give the shape away
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    if shape == "triangle":  # pointing up: apex (cx, cy - r), base y = cy + r, 2r wide
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def object_mask(obj: SceneObject, canvas: int = CANVAS) -> np.ndarray:
    """Bool ``(canvas, canvas)``: the pixels of ``obj``."""
    return shape_mask(obj.shape, obj.cx, obj.cy, obj.radius, canvas)


def render(scene: Scene, canvas: int = CANVAS) -> torch.Tensor:
    """The scene as a float image ``(3, canvas, canvas)`` in [-1, 1], background -1."""
    img = np.zeros((canvas, canvas, 3), dtype=np.float32)
    for o in scene.objects:
        img[object_mask(o, canvas)] = COLOURS[o.colour]
    return torch.from_numpy(img).permute(2, 0, 1) * 2 - 1


# ---------------------------------------------------------------------------- sampling scenes
def _apart(a: SceneObject, b: SceneObject) -> bool:
    """Bounding boxes at least ``GAP`` apart along x or y."""
    need = a.radius + b.radius + GAP
    return abs(a.cx - b.cx) >= need or abs(a.cy - b.cy) >= need


def _centre(rng: np.random.Generator, r: float) -> float:
    return float(rng.uniform(r + MARGIN, CANVAS - r - MARGIN))


def relation_of(a: tuple[float, float], b: tuple[float, float]) -> str:
    """Where centre ``a = (x, y)`` lies relative to ``b``: the dominant axis decides (y down)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _objects(rng: np.random.Generator, n: int, allowed: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    out = []
    for _ in range(n):
        shape, colour = allowed[int(rng.integers(len(allowed)))]
        size = "small" if n == 3 else list(SIZES)[int(rng.integers(len(SIZES)))]
        out.append((shape, colour, size))
    return out


def _place(rng: np.random.Generator, attrs: list[tuple[str, str, str]]) -> Scene | None:
    """Positions for ``attrs`` (one rejection-sampling try; None when it failed)."""
    if len(attrs) == 1:
        s, c, z = attrs[0]
        r = SIZES[z]
        return Scene((SceneObject(s, c, z, _centre(rng, r), _centre(rng, r)),))
    if len(attrs) == 2:
        rel = RELATIONS[int(rng.integers(len(RELATIONS)))]
        a, b = (SceneObject(s, c, z, _centre(rng, SIZES[z]), _centre(rng, SIZES[z])) for s, c, z in attrs)
        dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
        along, across = (dx, dy) if rel in ("left of", "right of") else (dy, dx)
        if not (_apart(a, b) and along >= 2 * across and relation_of((a.cx, a.cy), (b.cx, b.cy)) == rel):
            return None
        return Scene((a, b), rel)
    # three small objects, left to right, with GAP between their columns
    r = SIZES["small"]
    xs = np.sort(rng.uniform(r + MARGIN, CANVAS - r - MARGIN, size=3))
    if np.diff(xs).min() < 2 * r + GAP:
        return None
    return Scene(tuple(SceneObject(s, c, z, float(x), _centre(rng, r)) for (s, c, z), x in zip(attrs, xs)))


def random_scene(rng: np.random.Generator, allowed: Sequence[tuple[str, str]],
                 required: Sequence[tuple[str, str]] = (), max_tries: int = 10_000) -> Scene:
    """A random scene whose objects' (shape, colour) are all in ``allowed``; with ``required``
    non-empty, at least one object's combination is from ``required`` (which must be a subset
    of ``allowed``)."""
    allowed = list(allowed)
    n = int(rng.choice(len(COUNT_PROBS), p=COUNT_PROBS)) + 1
    for _ in range(max_tries):
        attrs = _objects(rng, n, allowed)
        if required and not any((s, c) in set(required) for s, c, _ in attrs):
            i = int(rng.integers(n))
            attrs[i] = (*required[int(rng.integers(len(required)))], attrs[i][2])
        scene = _place(rng, attrs)
        if scene is not None:
            return scene
    raise RuntimeError(f"could not place {n} objects in {max_tries} tries")  # (never seen: placement is easy)


def all_combos() -> list[tuple[str, str]]:
    return [(s, c) for s in SHAPES for c in COLOURS]


def check_held_out(held_out: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Validate held-out combinations: known (shape, colour) pairs that leave every shape and
    colour in training."""
    held = tuple(tuple(h) for h in held_out)
    bad = [h for h in held if h not in all_combos()]
    if bad:
        raise ValueError(f"held_out: {bad} are not (shape, colour) pairs of shapes {SHAPES} and colours "
                         f"{tuple(COLOURS)}")
    seen = [c for c in all_combos() if c not in held]
    missing = ([s for s in SHAPES if s not in {c[0] for c in seen}]
               + [c for c in COLOURS if c not in {x[1] for x in seen}])
    if missing:
        raise ValueError(f"held_out removes every scene with {missing} from training; hold out fewer combinations")
    return held


def scene_at(seed: int, split: str, index: int, held_out: Sequence[tuple[str, str]] = HELD_OUT) -> Scene:
    """Scene ``index`` of ``split`` (one of :data:`SPLITS`), from its own RNG stream."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    held = check_held_out(held_out)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS.index(split), int(index)]))
    if split == "test_heldout":
        return random_scene(rng, all_combos(), required=held)
    return random_scene(rng, [c for c in all_combos() if c not in held])


class CaptionedScenes(torch.utils.data.Dataset):
    """``n`` scenes of ``split``: ``images (n, 3, 32, 32)`` in [-1, 1], ``captions`` (n strings)
    and ``scenes`` (their :class:`Scene`). Item i is ``(image, caption)``."""

    def __init__(self, split: str, n: int, seed: int = 0, held_out: Sequence[tuple[str, str]] = HELD_OUT):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.split, self.seed, self.held_out = split, seed, check_held_out(held_out)
        self.scenes = [scene_at(seed, split, i, self.held_out) for i in range(n)]
        self.captions = [caption(s) for s in self.scenes]
        self.images = torch.stack([render(s) for s in self.scenes]) if n else torch.zeros(0, 3, CANVAS, CANVAS)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        return self.images[i], self.captions[i]
