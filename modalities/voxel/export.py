"""Export voxel grids: ``.obj`` meshes (marching cubes) and PNG renders a person can look at."""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def voxel_mesh(vox: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Marching-cubes surface of one grid ``(R, R, R)``: ``(verts (V, 3) in [-1, 1]^3, faces (F, 3))``.
    The grid is zero-padded so shapes touching the border are closed."""
    from skimage.measure import marching_cubes

    v = np.asarray(vox, dtype=bool)
    if v.ndim != 3:
        raise ValueError(f"expected one occupancy grid (R, R, R), got shape {v.shape}")
    if not v.any():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    verts, faces, _, _ = marching_cubes(np.pad(v, 1).astype(np.float32), level=0.5)
    return (verts - 1 + 0.5) / v.shape[0] * 2 - 1, faces


def save_obj(vox: np.ndarray, path: str) -> str:
    """Write the marching-cubes mesh of ``vox`` as a Wavefront ``.obj`` (1-based faces)."""
    verts, faces = voxel_mesh(vox)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"# msar voxel mesh: {len(verts)} vertices, {len(faces)} faces\n")
        f.writelines(f"v {x:.5f} {y:.5f} {z:.5f}\n" for x, y, z in verts)
        f.writelines(f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in faces)
    return path


def _draw_mesh(ax, vox: np.ndarray, color=(0.35, 0.55, 0.85)) -> None:
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    verts, faces = voxel_mesh(vox)
    ax.set_xlim(-1, 1), ax.set_ylim(-1, 1), ax.set_zlim(-1, 1)
    ax.set_box_aspect((1, 1, 1), zoom=1.3)
    ax.view_init(elev=25, azim=-60)
    ax.set_axis_off()
    if len(faces) == 0:
        return
    tri = verts[faces]
    # Lambert shading from a fixed light, so the 3-D form reads without a renderer
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    n /= np.linalg.norm(n, axis=1, keepdims=True) + 1e-12
    light = np.array([0.4, -0.5, 0.75])
    shade = 0.35 + 0.65 * np.abs(n @ (light / np.linalg.norm(light)))
    colors = np.clip(np.outer(shade, color), 0, 1)
    ax.add_collection3d(Poly3DCollection(tri, facecolors=colors, edgecolors="none"))


def render_grid(voxels: Sequence[np.ndarray], path: str, titles: Sequence[str] | None = None,
                cols: int = 6, size: float = 2.0, colors: Sequence | None = None, dpi: int = 80) -> str:
    """Shaded marching-cubes renders of several grids in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(voxels)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    fig = plt.figure(figsize=(cols * size, rows * size))
    for i, v in enumerate(voxels):
        ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
        _draw_mesh(ax, v, (0.35, 0.55, 0.85) if colors is None else colors[i])
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def render_projections(voxels: Sequence[np.ndarray], path: str, titles: Sequence[str] | None = None,
                       dpi: int = 80) -> str:
    """Max-projections along x, y and z (one row per grid): cheap and exact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(voxels)
    fig, axes = plt.subplots(n, 3, figsize=(4.5, 1.5 * n), squeeze=False)
    for i, v in enumerate(voxels):
        v = np.asarray(v, dtype=bool)
        for a, (axis, name) in enumerate(((0, "side (x)"), (1, "front (y)"), (2, "top (z)"))):
            axes[i, a].imshow(np.rot90(v.max(axis=axis)), cmap="Greys", interpolation="nearest")
            axes[i, a].set_xticks([]), axes[i, a].set_yticks([])
            if i == 0:
                axes[i, a].set_title(name, fontsize=8)
        if titles is not None:
            axes[i, 0].set_ylabel(titles[i], fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
