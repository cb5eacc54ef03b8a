"""Procedural, labelled 3-D occupancy shapes, deterministic from a seed.

Every shape is an implicit solid evaluated at voxel centres of an ``R^3`` grid
spanning ``[-1, 1]^3``.  Arrays are indexed ``[x, y, z]`` with **z up** (the
convention of ``matplotlib``'s ``ax.voxels``), so "horizontal slice" means
``vox[:, :, z]``.

Classes (the label is the index in :data:`CLASSES`):

* primitives with a uniformly random 3-D rotation, size and position:
  ``sphere, box, cylinder, torus, capsule``;
* ``union``: a CSG union of 2-3 primitives, each centred inside the previous
  ones so the union is one solid;
* parametric furniture with a random yaw, size and position, standing upright:
  ``table`` (top + 4 legs), ``chair`` (seat + back + 4 legs),
  ``shelf`` (2 side panels + 2-5 boards; 3 or more when the grid resolves the gaps).

Thin parts are at least ~2-3 voxels thick at the requested resolution (and the
rare isolated voxel a grazing corner leaves is dropped), so every shape is one
6-connected component and tables / chairs have exactly 4 legs --
facts :mod:`modalities.voxel.metrics` checks on generated samples.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage

CLASSES: tuple[str, ...] = ("sphere", "box", "cylinder", "torus", "capsule", "union", "table", "chair", "shelf")
PRIMITIVES: tuple[str, ...] = CLASSES[:5]
FURNITURE_WITH_LEGS: tuple[str, ...] = ("table", "chair")
_MARGIN = 0.925  # solids stay inside [-0.925, 0.925]^3: the outermost voxel layer (centres at
# +-(1 - 1/R), >= 0.9375 for R >= 16) is always empty, so no shape is cut by the grid


# ---------------------------------------------------------------------------- geometry helpers
def grid_points(resolution: int) -> np.ndarray:
    """Voxel centres ``(R, R, R, 3)`` in ``[-1, 1]^3``, indexed ``[x, y, z]``."""
    c = (np.arange(resolution) + 0.5) / resolution * 2 - 1
    return np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniform random rotation ``(3, 3)`` from a normalised Gaussian quaternion."""
    w, x, y, z = rng.normal(size=4) / 1.0
    n = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def yaw_rotation(angle: float) -> np.ndarray:
    """Rotation about the vertical z axis."""
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def to_local(points: np.ndarray, center: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """World points ``(..., 3)`` -> the frame whose axes are the columns of ``rot``."""
    return (points - center) @ rot


# ---------------------------------------------------------------------------- primitives (local frame)
# Each primitive: (sample size params, bounding radius, occupancy test in the local frame).
def _sphere(p: np.ndarray, r: float) -> np.ndarray:
    return np.linalg.norm(p, axis=-1) <= r


def _box(p: np.ndarray, hx: float, hy: float, hz: float) -> np.ndarray:
    return (np.abs(p[..., 0]) <= hx) & (np.abs(p[..., 1]) <= hy) & (np.abs(p[..., 2]) <= hz)


def _cylinder(p: np.ndarray, r: float, h: float) -> np.ndarray:
    return (p[..., 0] ** 2 + p[..., 1] ** 2 <= r * r) & (np.abs(p[..., 2]) <= h)


def _torus(p: np.ndarray, major: float, minor: float) -> np.ndarray:
    ring = np.sqrt(p[..., 0] ** 2 + p[..., 1] ** 2) - major
    return ring ** 2 + p[..., 2] ** 2 <= minor * minor


def _capsule(p: np.ndarray, r: float, h: float) -> np.ndarray:
    z = np.clip(p[..., 2], -h, h)
    return p[..., 0] ** 2 + p[..., 1] ** 2 + (p[..., 2] - z) ** 2 <= r * r


def _primitive_params(name: str, rng: np.random.Generator, vox: float, scale: float = 1.0) -> tuple[tuple, float]:
    """Random size parameters of a primitive and its bounding radius.

    ``vox`` is the voxel size; thin dimensions are kept >= ~2.5 voxels so the
    solid stays 6-connected after rasterisation. ``scale`` shrinks the big
    dimensions (for CSG parts).
    """
    thin = 1.5 * vox  # minimum half-thickness
    if name == "sphere":
        r = max(rng.uniform(0.35, 0.85) * scale, 2 * thin)
        return (r,), r
    if name == "box":
        h = tuple(max(rng.uniform(0.2, 0.5) * scale, thin) for _ in range(3))
        return h, float(np.linalg.norm(h))
    if name == "cylinder":
        r, h = max(rng.uniform(0.2, 0.5) * scale, thin), max(rng.uniform(0.2, 0.7) * scale, thin)
        return (r, h), float(np.hypot(r, h))
    if name == "torus":
        minor = max(rng.uniform(0.12, 0.25) * scale, 1.5 * vox)
        major = rng.uniform(minor + max(0.15 * scale, 1.5 * vox), max(0.9 * scale - minor, minor + 2 * vox))
        return (major, minor), major + minor
    if name == "capsule":
        r, h = max(rng.uniform(0.15, 0.35) * scale, thin), rng.uniform(0.2, 0.55) * scale
        return (r, h), r + h
    raise ValueError(f"unknown primitive {name!r}; expected one of {PRIMITIVES}")


_OCCUPANCY: dict[str, Callable[..., np.ndarray]] = {
    "sphere": _sphere, "box": _box, "cylinder": _cylinder, "torus": _torus, "capsule": _capsule,
}


def _place(rng: np.random.Generator, bound: float) -> np.ndarray:
    """A centre such that a solid of bounding radius ``bound`` stays inside the margin."""
    room = max(_MARGIN - bound, 0.0)
    return rng.uniform(-room, room, size=3)


def primitive(name: str, rng: np.random.Generator, resolution: int) -> np.ndarray:
    """One primitive with a random rotation, size and position: bool ``(R, R, R)``."""
    vox = 2.0 / resolution
    params, bound = _primitive_params(name, rng, vox)
    center, rot = _place(rng, bound), random_rotation(rng)
    return _OCCUPANCY[name](to_local(grid_points(resolution), center, rot), *params)


def csg_union(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """Union of 2-3 random primitives; each new part is centred on an occupied voxel
    near the middle of the solid so far, so the parts overlap (one component)."""
    vox = 2.0 / resolution
    pts = grid_points(resolution)
    occ = np.zeros((resolution,) * 3, dtype=bool)
    for i in range(int(rng.integers(2, 4))):
        name = PRIMITIVES[int(rng.integers(len(PRIMITIVES)))]
        params, bound = _primitive_params(name, rng, vox, scale=0.6)
        if i == 0:
            center = _place(rng, max(bound, 0.45))
        else:
            # an occupied voxel within the inner cube, so a part of radius <= 0.45 still fits
            inner = occ & (np.abs(pts).max(axis=-1) <= _MARGIN - bound)
            cand = np.argwhere(inner)
            if len(cand) == 0:
                cand = np.argwhere(occ)
                params, bound = _primitive_params(name, rng, vox, scale=0.35)
            center = pts[tuple(cand[int(rng.integers(len(cand)))])]
        occ |= _OCCUPANCY[name](to_local(pts, center, random_rotation(rng)), *params)
    return occ


# ---------------------------------------------------------------------------- furniture (upright, random yaw)
def _boxes(resolution: int, boxes: Sequence[tuple[np.ndarray, np.ndarray]], center: np.ndarray,
           yaw: float) -> np.ndarray:
    """Union of axis-aligned boxes (lo, hi) in the object frame, yawed and translated."""
    p = to_local(grid_points(resolution), center, yaw_rotation(yaw))
    occ = np.zeros((resolution,) * 3, dtype=bool)
    for lo, hi in boxes:
        occ |= np.all((p >= lo) & (p <= hi), axis=-1)
    return occ


def _furniture_yaw(rng: np.random.Generator) -> float:
    """A quarter turn plus up to +-15 degrees: any facing, while thin legs stay compact
    blocks after rasterisation (at 45 degrees a 2-voxel leg aliases into a jagged sliver)."""
    return float(rng.integers(4) * np.pi / 2 + rng.uniform(-np.pi / 12, np.pi / 12))


def _footprint(rng: np.random.Generator, lo: float, hi: float, leg: float, vox: float) -> tuple[float, float]:
    """Half-extents (ax >= ay) of a footprint with room for >= 3 voxels between corner legs."""
    ax = max(rng.uniform(lo, hi), leg + 2 * vox)
    ay = max(rng.uniform(lo, ax), leg + 2 * vox)
    return max(ax, ay), ay


def _fit(rng: np.random.Generator, half_x: float, half_y: float, z_lo: float, z_hi: float) -> np.ndarray:
    """Random translation keeping the footprint (yawed by a quarter turn +- 15 degrees) and the z range inside."""
    big, small = max(half_x, half_y), min(half_x, half_y)
    reach = big * np.cos(np.pi / 12) + small * np.sin(np.pi / 12)  # largest extent along x or y
    room = max(_MARGIN - reach, 0.0)
    dz_lo, dz_hi = -_MARGIN - z_lo, _MARGIN - z_hi
    dz = rng.uniform(min(dz_lo, dz_hi), max(dz_lo, dz_hi)) if dz_hi > dz_lo else 0.5 * (dz_lo + dz_hi)
    return np.array([rng.uniform(-room, room), rng.uniform(-room, room), dz])


def _legs(ax: float, ay: float, side: float, z0: float, z1: float, inset: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Four square legs at the corners of a (2ax x 2ay) footprint."""
    out = []
    for sx in (-1, 1):
        for sy in (-1, 1):
            cx, cy = sx * (ax - inset - side / 2), sy * (ay - inset - side / 2)
            out.append((np.array([cx - side / 2, cy - side / 2, z0]), np.array([cx + side / 2, cy + side / 2, z1])))
    return out


def table(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """A top slab on four corner legs."""
    vox = 2.0 / resolution
    leg = rng.uniform(2.0, 2.6) * vox
    ax, ay = _footprint(rng, 0.5, 0.68, leg, vox)
    top_t = rng.uniform(2.0, 3.0) * vox
    height = rng.uniform(0.7, 1.4)
    inset = rng.uniform(0.0, max(min(0.08, ay - leg - 1.5 * vox), 0.0))
    parts = [(np.array([-ax, -ay, height - top_t]), np.array([ax, ay, height]))]
    parts += _legs(ax, ay, leg, 0.0, height - top_t + vox, inset)
    return _boxes(resolution, parts, _fit(rng, ax, ay, 0.0, height), _furniture_yaw(rng))


def chair(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """A seat on four legs with a back rising from its rear edge."""
    vox = 2.0 / resolution
    leg = rng.uniform(2.0, 2.6) * vox
    ax, ay = _footprint(rng, 0.45, 0.6, leg, vox)
    seat_t = rng.uniform(2.0, 3.0) * vox
    seat_z = rng.uniform(0.45, 0.75)  # height of the seat's underside
    back_h = rng.uniform(0.45, 0.7)
    back_t = rng.uniform(2.0, 2.8) * vox
    top = seat_z + seat_t + back_h
    parts = [(np.array([-ax, -ay, seat_z]), np.array([ax, ay, seat_z + seat_t])),
             (np.array([-ax, -ay, seat_z]), np.array([ax, -ay + back_t, top]))]
    parts += _legs(ax, ay, leg, 0.0, seat_z + vox, 0.0)
    return _boxes(resolution, parts, _fit(rng, ax, ay, 0.0, top), _furniture_yaw(rng))


def shelf(rng: np.random.Generator, resolution: int) -> np.ndarray:
    """Two vertical side panels joined by 2-5 evenly spaced horizontal boards (as many as
    keep >= 3 voxels between boards, at least 3 when that fits)."""
    vox = 2.0 / resolution
    ax = rng.uniform(0.35, 0.65)
    ay = rng.uniform(0.2, 0.35)
    height = rng.uniform(1.1, 1.75)
    panel = rng.uniform(2.0, 2.8) * vox
    board = rng.uniform(2.0, 2.6) * vox
    # boards at least ~3 voxels apart, so the gaps survive rasterisation
    max_boards = int(np.clip((height - board) // (board + 3 * vox) + 1, 2, 5))
    n = int(rng.integers(min(3, max_boards), max_boards + 1))
    parts = [(np.array([-ax, -ay, 0.0]), np.array([-ax + panel, ay, height])),
             (np.array([ax - panel, -ay, 0.0]), np.array([ax, ay, height]))]
    for z in np.linspace(0.0, height - board, n):
        parts.append((np.array([-ax, -ay, z]), np.array([ax, ay, z + board])))
    return _boxes(resolution, parts, _fit(rng, ax, ay, 0.0, height), _furniture_yaw(rng))


_BUILDERS: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    **{name: (lambda rng, res, _n=name: primitive(_n, rng, res)) for name in PRIMITIVES},
    "union": csg_union, "table": table, "chair": chair, "shelf": shelf,
}


# ---------------------------------------------------------------------------- public API
def class_index(label: int | str) -> int:
    """Label name or index -> index into :data:`CLASSES` (clear error otherwise)."""
    if isinstance(label, str):
        if label not in CLASSES:
            raise ValueError(f"unknown shape class {label!r}; expected one of {CLASSES}")
        return CLASSES.index(label)
    if isinstance(label, (bool, float)) or not isinstance(label, (int, np.integer)):
        raise TypeError(f"label must be a class name or int index, got {type(label).__name__}")
    if not 0 <= int(label) < len(CLASSES):
        raise ValueError(f"class index must lie in [0, {len(CLASSES)}), got {label}")
    return int(label)


def check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise TypeError(f"resolution must be an int, got {type(resolution).__name__}")
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16 voxels per side (thin parts need ~2 voxels), got {resolution}")
    return int(resolution)


def largest_component(vox: np.ndarray) -> np.ndarray:
    """Keep the largest 6-connected component: rasterising a rotated corner can leave an
    isolated voxel where the corner tip grazes a voxel centre."""
    lab, n = ndimage.label(vox)
    if n <= 1:
        return vox
    return lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)


def make_shape(label: int | str, rng: np.random.Generator, resolution: int = 32) -> np.ndarray:
    """One random shape of class ``label``: bool occupancy ``(R, R, R)`` indexed ``[x, y, z]``,
    one 6-connected component."""
    return largest_component(_BUILDERS[CLASSES[class_index(label)]](rng, check_resolution(resolution)))


def shape_at(seed: int, index: int, resolution: int = 32,
             classes: Sequence[int | str] | None = None) -> tuple[np.ndarray, int]:
    """Item ``index`` of the stream seeded by ``seed``: ``(occupancy (R, R, R) bool, label)``.

    Labels cycle through ``classes`` (all by default) so every prefix is balanced;
    each item has its own RNG stream, so item i does not depend on items < i.
    """
    cls = [class_index(c) for c in (classes if classes is not None else range(len(CLASSES)))]
    if not cls:
        raise ValueError("classes must be a non-empty list of class names or indices")
    label = cls[index % len(cls)]
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    return make_shape(label, rng, resolution), label


def make_dataset(n: int, resolution: int = 32, seed: int = 0,
                 classes: Sequence[int | str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` shapes: ``(voxels (n, R, R, R) bool, labels (n,) int64)``, deterministic from ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    vox = np.zeros((n,) + (check_resolution(resolution),) * 3, dtype=bool)
    labels = np.zeros(n, dtype=np.int64)
    for i in range(n):
        vox[i], labels[i] = shape_at(seed, i, resolution, classes)
    return vox, labels


class VoxelShapes(torch.utils.data.Dataset):
    """Map-style dataset over :func:`shape_at`: item i is ``(float occupancy (R, R, R), label)``.

    Shapes are generated once at construction (``n`` is small in practice) so
    epochs are cheap.
    """

    def __init__(self, n: int, resolution: int = 32, seed: int = 0,
                 classes: Sequence[int | str] | None = None):
        vox, labels = make_dataset(n, resolution, seed, classes)
        self.voxels = torch.from_numpy(vox).float()
        self.labels = torch.from_numpy(labels)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.voxels[i], self.labels[i]
