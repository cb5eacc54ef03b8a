"""Voxel metrics: reconstruction IoU, validity checks and MMD / COV / 1-NNA with Chamfer distance.

Distribution metrics follow the standard point-cloud protocol (Achlioptas et al.
2018; Yang et al. 2019, PointFlow): every shape becomes ``n`` points sampled
uniformly on its marching-cubes surface, and for a generated set G and a
reference set R with Chamfer distance d:

* MMD  = mean over r in R of min over g in G of d(g, r)   (fidelity, lower is better)
* COV  = % of r in R that are the nearest reference of some g   (diversity, higher is better)
* 1-NNA = accuracy of the leave-one-out 1-nearest-neighbour classifier telling G
  from R (50% is ideal; 100% = the sets are trivially separable; an exact copy of
  R scores 0% because every shape's nearest neighbour is its own twin).
"""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from .data import CLASSES


# ---------------------------------------------------------------------------- reconstruction
def iou(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-sample intersection over union of boolean occupancies ``(B, R, R, R)`` -> ``(B,)``.
    Two empty grids have IoU 1."""
    p = np.asarray(pred.cpu() if isinstance(pred, torch.Tensor) else pred).astype(bool)
    t = np.asarray(target.cpu() if isinstance(target, torch.Tensor) else target).astype(bool)
    if p.shape != t.shape:
        raise ValueError(f"iou: shapes differ, {p.shape} vs {t.shape}")
    axes = tuple(range(1, p.ndim))
    inter = (p & t).sum(axis=axes)
    union = (p | t).sum(axis=axes)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


# ---------------------------------------------------------------------------- validity
def num_components(vox: np.ndarray) -> int:
    """Number of 6-connected occupied components of one grid ``(R, R, R)``."""
    return int(ndimage.label(np.asarray(vox, dtype=bool))[1])


def count_legs(vox: np.ndarray, slab_fraction: float = 0.7) -> int:
    """Legs under the top (table) or seat (chair) of one upright grid ``(R, R, R)``, z up.

    The top / seat is the horizontal slice of largest area, extended downwards
    while slices keep ``>= slab_fraction`` of that area; the legs are the
    8-connected components of the horizontal slice halfway between the lowest
    occupied slice and the underside of that slab. Returns 0 when nothing is below it.
    """
    v = np.asarray(vox, dtype=bool)
    area = v.sum(axis=(0, 1))
    if area.max() == 0:
        return 0
    z = int(np.argmax(area))
    while z > 0 and area[z - 1] >= slab_fraction * area.max():
        z -= 1
    below = np.nonzero(area[:z])[0]
    if len(below) == 0:
        return 0
    mid = (int(below.min()) + z - 1) // 2
    return int(ndimage.label(v[:, :, mid], structure=np.ones((3, 3)))[1])


def validity(voxels: np.ndarray, labels: np.ndarray) -> dict:
    """Validity of a batch of grids ``(N, R, R, R)`` with class labels ``(N,)``.

    ``single_component``: % of non-empty shapes with exactly one 6-connected component.
    ``legs_ok[cls]``: % of tables / chairs with exactly 4 legs (the data always has 4).
    """
    voxels = np.asarray(voxels, dtype=bool)
    labels = np.asarray(labels)
    comps = np.array([num_components(v) for v in voxels])
    out: dict = {
        "single_component": float(np.mean(comps == 1) * 100) if len(comps) else float("nan"),
        "empty": float(np.mean(comps == 0) * 100) if len(comps) else float("nan"),
        "legs_ok": {}, "legs_histogram": {},
    }
    for name in ("table", "chair"):
        sel = labels == CLASSES.index(name)
        if sel.any():
            legs = np.array([count_legs(v) for v in voxels[sel]])
            out["legs_ok"][name] = float(np.mean(legs == 4) * 100)
            out["legs_histogram"][name] = {int(k): int(c) for k, c in zip(*np.unique(legs, return_counts=True))}
    return out


# ---------------------------------------------------------------------------- surface points
def surface_points(vox: np.ndarray, n: int = 512, rng: np.random.Generator | None = None) -> np.ndarray:
    """``n`` points ``(n, 3)`` sampled uniformly (by area) on the marching-cubes surface of one
    grid, in the ``[-1, 1]^3`` frame of :func:`modalities.voxel.data.grid_points`.
    An empty grid gives ``n`` copies of the origin (so distances stay finite)."""
    from skimage.measure import marching_cubes

    v = np.asarray(vox, dtype=bool)
    R = v.shape[0]
    rng = rng if rng is not None else np.random.default_rng(0)
    if not v.any():
        return np.zeros((n, 3))
    verts, faces, _, _ = marching_cubes(np.pad(v, 1).astype(np.float32), level=0.5)
    verts = (verts - 1 + 0.5) / R * 2 - 1  # padded index -> voxel-centre coordinates
    tri = verts[faces]  # (F, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    f = rng.choice(len(faces), size=n, p=area / area.sum())
    u, w = rng.random(n), rng.random(n)
    flip = u + w > 1
    u[flip], w[flip] = 1 - u[flip], 1 - w[flip]
    t = tri[f]
    return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + w[:, None] * (t[:, 2] - t[:, 0])


def point_clouds(voxels: np.ndarray, n: int = 512, seed: int = 0) -> torch.Tensor:
    """Surface point clouds of a batch ``(N, R, R, R)`` -> ``(N, n, 3)`` float32."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([surface_points(v, n, rng) for v in np.asarray(voxels)])).float()


# ---------------------------------------------------------------------------- distances and set metrics
def chamfer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Chamfer distance (mean squared nearest-neighbour distance, both directions summed)
    between point clouds ``(..., n, 3)`` and ``(..., m, 3)`` -> ``(...)``."""
    # float64: the fast |a|^2 + |b|^2 - 2ab form of cdist then leaves ~1e-16, not ~1e-7, for identical clouds
    d = torch.cdist(a.double(), b.double()).square()
    return (d.min(dim=-1).values.mean(-1) + d.min(dim=-2).values.mean(-1)).to(a.dtype)


def pairwise_chamfer(x: torch.Tensor, y: torch.Tensor, block: int = 16) -> torch.Tensor:
    """All Chamfer distances between clouds ``x (N, n, 3)`` and ``y (M, m, 3)`` -> ``(N, M)``."""
    out = torch.empty(x.shape[0], y.shape[0], dtype=torch.float64)
    for i in range(0, x.shape[0], block):
        xi = x[i:i + block]
        for j in range(0, y.shape[0], block):
            yj = y[j:j + block]
            out[i:i + block, j:j + block] = chamfer(xi[:, None].double(), yj[None].double())
    return out


def mmd_cov_1nna(gen: torch.Tensor, ref: torch.Tensor) -> dict:
    """MMD-CD, COV-CD (%) and 1-NNA-CD (%) of generated clouds ``(N, n, 3)`` vs reference ``(M, m, 3)``."""
    if gen.shape[0] == 0 or ref.shape[0] == 0:
        raise ValueError(f"need non-empty sets, got {gen.shape[0]} generated and {ref.shape[0]} reference clouds")
    d_gr = pairwise_chamfer(gen, ref)
    d_gg = pairwise_chamfer(gen, gen)
    d_rr = pairwise_chamfer(ref, ref)
    return set_metrics_from_distances(d_gr, d_gg, d_rr)


def set_metrics_from_distances(d_gr: torch.Tensor, d_gg: torch.Tensor, d_rr: torch.Tensor) -> dict:
    """MMD / COV / 1-NNA from the three distance matrices (generated x reference, G x G, R x R)."""
    N, M = d_gr.shape
    mmd = d_gr.min(dim=0).values.mean().item()
    cov = torch.unique(d_gr.argmin(dim=1)).numel() / M * 100
    # leave-one-out 1-NN over G u R; ties go to the lower index (G first), as torch.min does
    full = torch.cat([torch.cat([d_gg, d_gr], 1), torch.cat([d_gr.T, d_rr], 1)], 0)
    full.fill_diagonal_(float("inf"))
    nn_idx = full.argmin(dim=1)
    is_gen = torch.arange(N + M) < N
    correct = (is_gen[nn_idx] == is_gen).float().mean().item() * 100
    return {"mmd_cd": mmd, "cov_cd": cov, "1nna_cd": correct}
